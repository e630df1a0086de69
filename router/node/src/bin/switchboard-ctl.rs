//! `switchboard-ctl`: see [`switchboard_node::ctl`].
fn main() -> std::process::ExitCode {
    switchboard_node::ctl::main()
}
