//! Binary file transfers: an upload streamed into a user's file, a download streamed out of one,
//! beside the JSON file tools (whose bodies `ZCBOT_MAX_BODY` caps). Confined as the file tools are
//! (the same [`Workspace`]), within the user's disk quota, up to `ZCBOT_MAX_FILE`, and never
//! holding a whole file in memory: an upload is gathered into pieces of at most [`PIECE`] bytes,
//! each written on the file workers (so a tenant's uploads cannot delay another tenant's file
//! calls more than its file calls could); a download is an open file, read as the client takes it.
//!
//! An upload writes a new file beside the target and renames it over the target only once the
//! whole body has arrived: a body that breaks off, is too large, or runs out of time or disk
//! leaves the old file whole and no new one.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Executor;
use crate::error::file::shorten;
use crate::error::{Error, Result};
use crate::files::PendingWrite;
use crate::user::UserId;

/// The most bytes of an upload held in memory before they are written.
pub const PIECE: usize = 1 << 20;

/// An upload's [`PendingWrite`], dropped on the blocking pool: dropping an uncommitted one
/// unlinks a file of up to `ZCBOT_MAX_FILE` bytes, which may wait on the file system (a btrfs
/// commit), so it must never happen on an async worker, however the upload ends (an error, a
/// client gone, a file worker never free).
struct OffRuntime(Option<PendingWrite>);

impl OffRuntime {
    fn take(mut self) -> PendingWrite {
        self.0.take().expect("held until taken")
    }
}

impl Drop for OffRuntime {
    fn drop(&mut self) {
        if let Some(pending) = self.0.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                tokio::task::spawn_blocking(move || drop(pending));
            }
        }
    }
}

/// A file opened for a download: read it to `size` bytes (it may grow meanwhile; the rest is not
/// part of this download).
#[derive(Debug)]
pub struct Download {
    /// The open file.
    pub file: tokio::fs::File,
    /// Its size when opened.
    pub size: u64,
}

impl Executor {
    /// Writes the body `body` to `path` in `user`'s folder (parents created), replacing any file
    /// there only once the body is whole. `declared` is the body's announced length, refused at
    /// once when over `ZCBOT_MAX_FILE`. Returns the bytes written.
    pub async fn upload<S, E>(
        &self,
        user: &UserId,
        path: &str,
        declared: Option<u64>,
        mut body: S,
        cancel: &CancellationToken,
    ) -> Result<u64>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let cfg = self.config();
        let (max, deadline) = (cfg.max_file, Instant::now() + cfg.transfer_timeout);
        let too_large = |size: u64| Error::FileTooLarge {
            path: shorten(path),
            size,
            max,
        };
        let broken = |reason: String| Error::UploadBroken {
            path: shorten(path),
            reason,
        };
        if let Some(size) = declared.filter(|n| *n > max) {
            return Err(too_large(size));
        }
        let workspace = self.workspace_maker(user).await?;
        let target = path.to_owned();
        let mut pending = OffRuntime(Some(
            self.files()
                .run(user, path, cancel, move |_| {
                    workspace()?.begin_write(&target)
                })
                .await?,
        ));
        let mut piece: Vec<u8> = Vec::new();
        let mut total: u64 = 0;
        loop {
            let next = tokio::select! {
                next = body.next() => next,
                _ = cancel.cancelled() => {
                    return Err(Error::FileStopped {
                        path: shorten(path),
                        cancelled: true,
                        after: cfg.transfer_timeout,
                        progress: format!("{total} bytes had arrived; nothing was written (the daemon is shutting down)"),
                    })
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(broken(format!(
                        "it took longer than {} (ZCBOT_TRANSFER_TIMEOUT)",
                        humantime::format_duration(cfg.transfer_timeout)
                    )))
                }
            };
            let chunk = match next {
                None => break,
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => return Err(broken(e.to_string())),
            };
            total += chunk.len() as u64;
            if total > max {
                return Err(too_large(total));
            }
            piece.extend_from_slice(&chunk);
            if piece.len() >= PIECE {
                pending = self
                    .write_piece(user, path, cancel, pending, std::mem::take(&mut piece))
                    .await?;
            }
        }
        let shown = path.to_owned();
        self.files()
            .run(user, path, cancel, move |budget| {
                let mut pending = pending.take();
                pending.write(&piece)?;
                // Stopped meanwhile (its caller may have been told so): the old file stays.
                if budget.spent().is_some() {
                    return Err(budget.stopped(&shown, "nothing was written"));
                }
                pending.commit()
            })
            .await
    }

    /// Writes one piece of an upload on the file workers.
    async fn write_piece(
        &self,
        user: &UserId,
        path: &str,
        cancel: &CancellationToken,
        pending: OffRuntime,
        piece: Vec<u8>,
    ) -> Result<OffRuntime> {
        self.files()
            .run(user, path, cancel, move |_| {
                let mut pending = pending.take();
                pending.write(&piece)?;
                Ok(OffRuntime(Some(pending)))
            })
            .await
    }

    /// Opens `path` in `user`'s folder for a download: a regular file of at most `ZCBOT_MAX_FILE`
    /// bytes (a folder, a symlink out, a FIFO or a device is refused as the file tools refuse it).
    pub async fn download(
        &self,
        user: &UserId,
        path: &str,
        cancel: &CancellationToken,
    ) -> Result<Download> {
        let max = self.config().max_file;
        let workspace = self.workspace_maker(user).await?;
        let target = path.to_owned();
        let (file, size) = self
            .files()
            .run(user, path, cancel, move |_| workspace()?.open_file(&target))
            .await?;
        if size > max {
            return Err(Error::FileTooLarge {
                path: shorten(path),
                size,
                max,
            });
        }
        Ok(Download {
            file: tokio::fs::File::from_std(file),
            size,
        })
    }

    /// How long one transfer may take in all (`ZCBOT_TRANSFER_TIMEOUT`).
    pub fn transfer_timeout(&self) -> Duration {
        self.config().transfer_timeout
    }
}
