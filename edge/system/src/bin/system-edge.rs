//! The edge as the system tests run it: `switchboard_edge::main`, the
//! shipped `switchboard-edge`'s whole `main`.
fn main() -> std::process::ExitCode {
    switchboard_edge::main()
}
