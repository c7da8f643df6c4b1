//! `strata completions SHELL` and `strata man [SUBCOMMAND]`: shell
//! completion scripts and roff man pages, generated from the clap
//! definitions so they cannot drift from the commands.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::CommandFactory;

use crate::Cli;

/// Arguments of `strata completions`.
#[derive(clap::Args)]
pub struct Args {
    /// The shell to write a completion script for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// Arguments of `strata man`.
#[derive(clap::Args)]
pub struct ManArgs {
    /// Write the page of this subcommand (`strata-NAME`) instead of strata's.
    subcommand: Option<String>,
}

/// Print the completion script for a shell to stdout, e.g.
/// `strata completions bash > /etc/bash_completion.d/strata`.
pub fn completions(a: Args) -> Result<ExitCode> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "strata", &mut out);
    write_stdout(&out, "completion script")
}

/// Print strata's man page (or a subcommand's) as roff to stdout, e.g.
/// `strata man | man -l -`.
pub fn man(a: ManArgs) -> Result<ExitCode> {
    let mut cmd = Cli::command();
    // building fills in the subcommands' display names (`strata-pull`)
    cmd.build();
    let page = match &a.subcommand {
        None => cmd,
        Some(name) => match cmd.find_subcommand(name) {
            Some(sub) => sub.clone().version(env!("CARGO_PKG_VERSION")),
            None => {
                let known: Vec<&str> = cmd.get_subcommands().map(|c| c.get_name()).collect();
                bail!(
                    "writing man page: no subcommand {name:?} (known: {})",
                    known.join(", ")
                );
            }
        },
    };
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .context("rendering man page")?;
    write_stdout(&out, "man page")
}

fn write_stdout(bytes: &[u8], what: &str) -> Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .with_context(|| format!("writing {what} to stdout"))?;
    Ok(ExitCode::SUCCESS)
}
