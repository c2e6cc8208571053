//! gmail-sync: thin entry point. Everything lives in the library (see ARCHITECTURE.md).

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = gmail_sync::cli::Cli::parse();
    let code = gmail_sync::cli::execute(cli).await;
    std::process::exit(code);
}
