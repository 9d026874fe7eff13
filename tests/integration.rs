//! Every integration test in one binary: the support code is compiled and the binary linked
//! once, and the tests of all files share the runner's threads. Each file is a module: `cargo
//! test --test integration sms::` runs one file's tests.

mod support;

mod abuse;
mod adhoc;
mod admin_docs;
mod cli;
mod email;
mod extract_golden;
mod flood;
mod foundation;
mod harness_selftest;
mod hostile;
mod instances;
mod instances_soak;
mod integrated;
mod kannel_selftest;
mod ops;
mod presence;
mod replies;
mod routing;
mod sms;
mod smtp_abuse;
mod soak;
