//! The process's one tokio runtime.

use anyhow::Context;

pub fn build() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("shoal")
        .build()
        .context("build tokio runtime")
}
