//! The system tests: real edge and router processes (this package's
//! `system-edge` and `system-router`, the shipped binaries' `main`s) and
//! in-process edges and routers, with real NATS, Redis, browsers, k6 and
//! Prometheus. One binary, one module per area, so the suite links once.
mod common;

mod auth;
mod authorization;
mod browser;
mod chat;
mod client;
mod cluster;
mod conformance;
mod ctl;
mod deflate;
mod drain;
mod failover;
mod fuzz;
mod grpc;
mod hooks;
mod http;
mod k6;
mod limits;
mod logs;
mod nats_cluster;
mod operate;
mod positions;
mod redis_modes;
mod scenarios;
mod stall;
mod stop;
mod tap;
mod tls;
#[cfg(feature = "otel")]
mod traces;
