//! zcbot egress: the allowlist HTTP proxy between the sandboxes and the outside world.
//!
//! In the daemon's egress mode `allowlist`, a sandbox's only way out is this proxy, running
//! in its own hardened container (uid 65534, read-only root, no capabilities, a `FROM
//! scratch` image holding only this static binary) on the sandboxes' internal network and one
//! outbound network. It decides, per client connection, whether the destination host name is
//! on that client's allowlist.
//!
//! # Modules
//! - [`pattern`]: the allowlist patterns (`example.org`, `*.example.org`, `:PORT`), host-name
//!   normalisation, matching and covering. No heavy dependencies.
//! - [`protocol`]: the control protocol ([`protocol::Command`], [`protocol::Report`]) and the
//!   configuration ([`protocol::ProxyConfig`]). No heavy dependencies: the daemon uses these
//!   with `default-features = false`.
//! - `proxy` (feature `proxy`, on by default): the proxy machinery (tokio, hickory DNS).
//!
//! # Control protocol (JSON, one object per line)
//! Daemon → proxy, on stdin:
//! - `{"seq":N,"op":"reset"}`: forget every client.
//! - `{"seq":N,"op":"set","ip":"172.18.0.5","user":"alice","allow":["pypi.org","*.pythonhosted.org"]}`:
//!   the client at that source IP is `alice` with this effective allowlist (replacing any
//!   previous entry). One unparsable pattern rejects the whole command; the table is unchanged.
//! - `{"seq":N,"op":"drop","ip":"172.18.0.5"}`: forget that client.
//!
//! Commands are applied in order; each gets an `ack` (or an `error`) before the next is read,
//! so once the daemon has the `ack` of a `set`, new connections from that IP are known.
//! Commands never affect connections already open (they keep the allowlist they started
//! with). A line over 256 KiB is refused with an `error` and skipped without being buffered.
//! At end of stdin the proxy keeps running with the table it has: the daemon may re-attach
//! (a new `docker attach`) and send `reset`.
//!
//! Proxy → daemon, on stdout:
//! - `{"kind":"ready","listen":"0.0.0.0:3128"}` once listening;
//! - `{"kind":"ack","seq":N}` after a command is applied;
//! - `{"kind":"error","seq":N|null,"message":"..."}` for a line that could not be applied;
//! - `{"kind":"conn","user":"alice"|null,"client":"172.18.0.5","host":"pypi.org"|null,
//!   "port":443|null,"method":"CONNECT"|null,"verdict":"allowed"|"refused","reason":"...",
//!   "up":N,"down":N,"ms":N}`: exactly one per client connection, when it is refused or,
//!   for an allowed one, when it closes. `reason` is always present: `ok` for allowed ones,
//!   else one of `unknown_client`, `too_many_connections`, `bad_request`, `not_allowed`,
//!   `ip_literal`, `no_sni`, `sni_mismatch`, `blocked_address`, `resolve_failed`,
//!   `connect_failed`. `host`, `port` and `method` are `null` when the refusal came before
//!   the head was read (unknown client, cap, timeout, unparsable head). Never the payload,
//!   path or query; `host` is at most 253 characters.
//! - `{"kind":"dropped","count":N}`: N `conn` reports were dropped because stdout was not
//!   read fast enough (connections never wait for stdout; control replies do).
//!
//! # Decisions
//! - The configuration is one JSON document in `ZCBOT_EGRESS_CONFIG` (a
//!   [`protocol::ProxyConfig`]); an invalid or missing one prints an error and exits 2.
//! - Destinations are names only: IP literals (including `127.1`-style forms) are refused.
//! - Names are resolved per connection by hickory (from `/etc/resolv.conf`, cache off, no
//!   `/etc/hosts`, no search domains); if any answer is in `blocked`, in `0.0.0.0/8`/`::`, or
//!   one of `host_addrs`, the connection is refused, and only checked addresses are
//!   connected to. Names in `resolve` (operator overrides) skip the check.
//! - CONNECT: the proxy answers 200, then reads the first TLS record (bounded by the header
//!   timeout, counted from accept) and requires a ClientHello whose SNI equals the CONNECT
//!   host; only then it resolves and connects. Refusals after the 200 just close the
//!   connection (the client sees a TLS failure; the report carries the reason), and so do
//!   resolve/connect failures there. A ClientHello continuing past the first record is
//!   refused as `no_sni`. Encrypted Client Hello's outer name will not match: refused.
//! - Plain HTTP: absolute-form `http://` only, one request per connection, a
//!   `Content-Length` body only (no `Transfer-Encoding`), rewritten to origin-form with the
//!   hop-by-hop headers removed and `Connection: close`; nothing the client sends after the
//!   body reaches the server.
//! - SIGTERM/SIGINT exit 0 at once (the proxy is PID 1 in its container); reports still
//!   queued are lost.

pub mod pattern;
pub mod protocol;

#[cfg(feature = "proxy")]
pub mod proxy;
