//! The integration tests: one binary, one harness (`support`). Each module
//! drives the daemon from outside (HTTP, the binary, the simulator), or the
//! library functions its commands call.

mod alerts;
mod care;
mod console;
mod demo;
mod edge;
mod faults;
mod ingress;
mod openapi;
mod ops;
mod packaging;
mod pipeline;
mod postgres;
mod properties;
mod replicas;
mod secrets;
mod sim;
mod support;
