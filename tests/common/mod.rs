//! Shared integration-test harnesses (real etcd, real agents).
#![allow(dead_code)]
pub mod cluster;
pub mod deploy;
pub mod etcd;
pub mod probe;
pub mod writers;
