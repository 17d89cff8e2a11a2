//! The Docker client: connect, negotiate the API version, and bound every call with a deadline.
//!
//! bollard's own timeout covers only response headers, and a hung daemon must never hang the pool,
//! so every call the pool makes goes through [`Docker::call`], which adds a deadline and turns the
//! outcome into this crate's [`Error`] with what was being done.

use std::future::Future;
use std::time::Duration;

use crate::config::Config;
use crate::error::{Error, Result};

/// A cheaply cloned handle on the engine, with the deadline every call gets.
#[derive(Clone, Debug)]
pub struct Docker {
    inner: bollard::Docker,
    host: String,
    timeout: Duration,
}

impl Docker {
    /// Connects to `DOCKER_HOST` (or the local socket) and negotiates the API version down to what
    /// the engine speaks (1.41 on Debian bookworm's engine). Fails with
    /// [`Error::DockerUnreachable`] or [`Error::DockerTimeout`] when no engine answers.
    pub async fn connect(config: &Config) -> Result<Self> {
        let host = config.docker_host_display();
        // bollard's own timeout only backs ours up: a second longer, so ours normally fires first.
        let backstop = Duration::from_secs(config.docker_timeout.as_secs() + 1);
        let client = match &config.docker_host {
            Some(h) => bollard::Docker::connect_with_host(h),
            None => bollard::Docker::connect_with_local_defaults(),
        }
        .map_err(|source| Error::DockerUnreachable {
            host: host.clone(),
            source,
        })?
        .with_timeout(backstop);
        let mut docker = Docker {
            inner: client.clone(),
            host,
            timeout: config.docker_timeout,
        };
        let host = docker.host.clone();
        docker.inner = docker
            .call(
                || format!("the version handshake at {host}"),
                client.negotiate_version(),
            )
            .await?;
        tracing::debug!(host = %docker.host, api = %docker.api_version(), "connected to Docker");
        Ok(docker)
    }

    /// The raw bollard client, for calls that stream (their reads need their own deadlines).
    pub fn raw(&self) -> &bollard::Docker {
        &self.inner
    }

    /// The engine's address, as used in messages.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The deadline of one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The API version in use after negotiation, e.g. "1.41".
    pub fn api_version(&self) -> String {
        self.inner.client_version().to_string()
    }

    /// Runs one Docker call with the deadline; `op` says what it does ("create container x").
    pub async fn call<T, F>(&self, op: impl FnOnce() -> String, fut: F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, bollard::errors::Error>>,
    {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(Error::DockerTimeout {
                op: op(),
                after: self.timeout,
            }),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.classify(op(), e)),
        }
    }

    /// Maps a bollard error to ours: transport failures mean the daemon is unreachable.
    pub fn classify(&self, op: String, e: bollard::errors::Error) -> Error {
        use bollard::errors::Error as B;
        match e {
            B::IOError { .. }
            | B::HyperLegacyError { .. }
            | B::SocketNotFoundError(_)
            | B::HttpClientError { .. } => Error::DockerUnreachable {
                host: self.host.clone(),
                source: e,
            },
            B::RequestTimeoutError => Error::DockerTimeout {
                op,
                after: self.timeout,
            },
            other => Error::Docker { op, source: other },
        }
    }
}
