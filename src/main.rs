//! gmail-sync: thin entry point. Everything lives in the library (see ARCHITECTURE.md).

use clap::Parser;
use gmail_sync::cli::{RUNTIME_SHAPE, runtime};

fn main() {
    let cli = gmail_sync::cli::Cli::parse();
    let code = match runtime(RUNTIME_SHAPE) {
        Ok(runtime) => runtime.block_on(gmail_sync::cli::execute(cli)),
        Err(e) => {
            eprintln!("gmail-sync: could not start the async runtime: {e}");
            1
        }
    };
    std::process::exit(code);
}
