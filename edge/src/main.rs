//! `switchboard-edge`: see [`switchboard_edge::main`].
fn main() -> std::process::ExitCode {
    switchboard_edge::main()
}
