//! The router as the system tests run it: `switchboard_router_server::main`,
//! the shipped `switchboard-router`'s whole `main`.
fn main() -> std::process::ExitCode {
    switchboard_router_server::main()
}
