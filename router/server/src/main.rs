//! `switchboard-router`: see [`switchboard_router_server::main`].
// glibc's allocator spent a fifth of the router's CPU on the publish
// path (perf: consolidation of freed chunks); mimalloc keeps per-thread
// free lists. docs/benchmarks.md, `sequence`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    switchboard_router_server::main()
}
