//! `pat`: adaptive tensor parallelism for the long-tail generation stage of synchronous RLHF.

pub mod backend;
pub mod cli;
pub mod engine;
pub mod error;
pub mod kv;
pub mod model;
pub mod parallel;
pub mod policy;
pub mod reshard;
pub mod sim;
pub mod stats;

pub use error::{Error, Result};
