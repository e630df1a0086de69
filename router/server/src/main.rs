//! `switchboard-router`: see [`switchboard_router_server::main`].
fn main() -> std::process::ExitCode {
    switchboard_router_server::main()
}
