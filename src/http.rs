//! What Reach's two small HTTP servers (the SMS webhook and the metrics endpoint) share: serving
//! one HTTP/1.1 connection with a header timeout, closed gracefully at shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Resolves once shutdown is asked for (the value is true, or the sender is gone).
pub(crate) async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Serves one connection with `respond` until the client closes it or shutdown is asked for
/// (then the request in progress is answered first). `what` names the server in the log.
pub(crate) async fn serve_connection<F, R, B>(
    stream: TcpStream,
    peer: SocketAddr,
    header_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
    what: &'static str,
    respond: F,
) where
    F: Fn(Request<Incoming>) -> R + Send + Sync + 'static,
    R: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes, Error = Infallible> + Send + 'static,
{
    let service = service_fn(move |request| {
        let answer = respond(request);
        async move { Ok::<_, Infallible>(answer.await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown_requested(&mut shutdown) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "{what} connection ended with an error");
    }
}
