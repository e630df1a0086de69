//! The operator's CLI as the system tests run it: `switchboard_node::ctl::main`,
//! the shipped `switchboard-ctl`'s whole `main`.
fn main() -> std::process::ExitCode {
    switchboard_node::ctl::main()
}
