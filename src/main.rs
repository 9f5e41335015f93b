//! The `knoq-gateway` binary: parses the command line and hands over to
//! `cli`. Lifecycle only.

fn main() -> std::process::ExitCode {
    knoq_gateway::cli::main()
}
