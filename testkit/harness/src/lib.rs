//! Test-only local stack for the bridge: moto's server as S3 and SQS on loopback
//! ([`moto`]), the real function binaries behind cargo-lambda's Lambda runtime emulator
//! ([`emulator`]), and the poller that hands S3 notifications from SQS to them the way a Lambda
//! event source mapping does ([`poller`]). Integration tests and `make demo` build on this, so
//! locally, as on AWS, an upload is what starts a function.

pub mod catalog;
pub mod emulator;
pub mod moto;
pub mod paths;
pub mod poller;
pub mod samples;
pub mod stack;

pub use emulator::FunctionUnderEmulator;
pub use moto::Moto;
pub use poller::Poller;
