//! Tokens (`PREFIX-N`, N counting up) that tests write into messages so as to recognise each
//! message wherever and however often it arrives, and the order in which they arrive.

/// Words of `text` that look like `PREFIX-DIGITS`.
pub fn tokens(text: &str, prefix: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| {
            w.strip_prefix(prefix)
                .and_then(|r| r.strip_prefix('-'))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(str::to_owned)
        .collect()
}

/// The N of a token `PREFIX-N` (0 if it has none).
pub fn token_number(token: &str) -> u64 {
    token
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Reordering of a sequence of arrivals (numbers in the order they were sent): how many arrived
/// after one sent later ("late"), and the largest such distance.
pub fn reordering(arrivals: &[u64]) -> (usize, u64) {
    let mut highest = None::<u64>;
    let (mut late, mut farthest) = (0, 0);
    for &n in arrivals {
        match highest {
            Some(h) if n < h => {
                late += 1;
                farthest = farthest.max(h - n);
            }
            _ => highest = Some(n),
        }
    }
    (late, farthest)
}
