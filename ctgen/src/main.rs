//! The `ctgen` command: parses its arguments and runs the generator.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let opts = ctgen::Options::parse();
    match ctgen::run(&opts) {
        Ok(summary) => {
            println!("{summary}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ctgen: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
