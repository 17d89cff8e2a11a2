//! The tools as a language model is shown them: a name, a description, and a JSON Schema of the
//! arguments. The schemas are generated from the very types [`super::ToolCall::parse`] reads, so
//! what a model is told and what the daemon accepts cannot drift apart; the descriptions quote the
//! running configuration's limits.

use serde_json::Value;
use utoipa::PartialSchema;

use super::{PathArgs, PythonArgs, ReadFileArgs, ShellArgs, WriteFileArgs};
use crate::config::{Backend, Config, Egress};

/// One tool: what `GET /v1/tools` and MCP's `tools/list` describe.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    /// The name calls use (`shell`, `run_python`, ...).
    pub name: &'static str,
    /// What it does and what it answers, for a model choosing a tool.
    pub description: String,
    /// A self-contained JSON Schema (no `$ref`) of an object of its arguments.
    pub parameters: Value,
}

/// Arguments a model is not offered: `background` answers with a job to follow instead of the
/// result, which a tool loop that waits for a result cannot use. The HTTP API still takes it.
const API_ONLY: &[&str] = &["background"];

/// The tools, in the order a model is best shown them.
pub fn tools(cfg: &Config) -> Vec<ToolSpec> {
    let cap = human_bytes(cfg.output_cap as u64);
    let hosts;
    let network = match cfg.egress {
        Egress::None => "no network at all",
        Egress::Public => "public internet addresses only (no private ranges, no host)",
        Egress::Allowlist => {
            let mut list: Vec<String> = cfg.egress_allow.iter().map(ToString::to_string).collect();
            if list.len() > 20 {
                list.truncate(20);
                list.push("...".into());
            }
            hosts = format!(
                "network access only to these hosts, through an HTTP proxy the environment \
                 already names (HTTP_PROXY; pip, curl and Python's urllib use it): {}",
                list.join(", ")
            );
            hosts.as_str()
        }
    };
    // The model is told the truth about where its commands run.
    let place = match cfg.backend {
        Backend::Docker => format!(
            "in this user's own Linux sandbox: Debian with Python 3 and common tools, an \
             unprivileged user, {network}"
        ),
        Backend::Host => "on the daemon's own machine (a development setup: NOT isolated, \
                          with its network)"
            .to_owned(),
    };
    let timeouts = format!(
        "timeout: seconds or a duration such as \"2m\"; default {}, at most {}",
        humantime::format_duration(cfg.exec_timeout),
        humantime::format_duration(cfg.exec_timeout_max),
    );
    vec![
        ToolSpec {
            name: "shell",
            description: format!(
                "Run a shell command (sh -c COMMAND) {place}. The working folder is /workspace, \
                 whose files persist between calls and are the ones the file tools see. Answers exit_code, stdout and stderr (each at most {cap}: the middle of \
                 longer output is dropped) and timed_out. {timeouts}."
            ),
            parameters: schema(ShellArgs::schema()),
        },
        ToolSpec {
            name: "run_python",
            description: format!(
                "Run a Python 3 program in the same sandbox and folder as shell; print what you \
                 want to see. Without session every call is a fresh interpreter. With session \
                 (a name you choose) the code runs in a persistent interpreter of that name: \
                 variables, imports and the working folder stay between calls, the value of a \
                 final expression comes back as value, an exception as error, and figures as \
                 results. Output at most {cap} per stream. {timeouts}."
            ),
            parameters: schema(PythonArgs::schema()),
        },
        ToolSpec {
            name: "read_file",
            description: format!(
                "Read a file under /workspace (a relative path is taken from /workspace). Answers \
                 data.content (UTF-8 text; data.content_base64 when the bytes are not text), \
                 data.size, data.bytes_read and data.eof. At most {cap} per call: read a large \
                 file in pieces with offset and limit."
            ),
            parameters: schema(ReadFileArgs::schema()),
        },
        ToolSpec {
            name: "write_file",
            description: "Create or replace a file under /workspace from text (content) or bytes \
                          (content_base64); missing parent folders are created, append adds to \
                          the end. A write that fails leaves the old file whole. Answers \
                          data.bytes_written."
                .into(),
            parameters: schema(WriteFileArgs::schema()),
        },
        ToolSpec {
            name: "list_dir",
            description: "List a folder under /workspace. Answers data.entries (name, kind: \
                          file, dir, symlink or other, size), sorted by name, at most 10,000, \
                          and data.truncated."
                .into(),
            parameters: schema(PathArgs::schema()),
        },
        ToolSpec {
            name: "delete_path",
            description: "Delete a file, or a folder with everything in it, under /workspace. A \
                          symlink is removed itself, never what it points to. Answers \
                          data.entries, the number of entries removed."
                .into(),
            parameters: schema(PathArgs::schema()),
        },
    ]
}

/// The tool of that name.
pub fn tool(cfg: &Config, name: &str) -> Option<ToolSpec> {
    tools(cfg).into_iter().find(|t| t.name == name)
}

/// An argument type's schema as a model is given it: without the API-only arguments and without
/// the Rust-side title.
fn schema(s: utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    if let Some(obj) = v.as_object_mut() {
        obj.remove("title");
        if let Some(Value::Object(props)) = obj.get_mut("properties") {
            for name in API_ONLY {
                props.remove(*name);
            }
        }
        if let Some(Value::Array(req)) = obj.get_mut("required") {
            req.retain(|r| !API_ONLY.iter().any(|n| r == n));
        }
    }
    v
}

/// `65536` as `64 KiB`.
fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::ToolCall;

    fn cfg() -> Config {
        Config::from_lookup(|_| None).unwrap()
    }

    #[test]
    fn every_tool_parses_and_its_schema_is_a_closed_self_contained_object() {
        for t in tools(&cfg()) {
            let text = t.parameters.to_string();
            assert!(!text.contains("$ref"), "{}: {text}", t.name);
            assert_eq!(t.parameters["type"], "object", "{}", t.name);
            assert_eq!(
                t.parameters["additionalProperties"],
                Value::Bool(false),
                "{}: unknown arguments are refused, so the schema says so",
                t.name
            );
            assert!(t.parameters["properties"].get("background").is_none());
            // The name is one the parser knows: an empty call fails on its arguments, not its name.
            let e = ToolCall::parse(t.name, serde_json::json!({})).unwrap_err();
            assert_eq!(e.kind(), "bad_call", "{}", t.name);
        }
    }

    #[test]
    fn required_arguments_are_the_ones_the_parser_requires() {
        let required = |name: &str| -> Vec<String> {
            serde_json::from_value(tool(&cfg(), name).unwrap().parameters["required"].clone())
                .unwrap()
        };
        assert_eq!(required("shell"), ["command"]);
        assert_eq!(required("run_python"), ["code"]);
        assert_eq!(required("read_file"), ["path"]);
        assert_eq!(required("write_file"), ["path"]);
        // And the positive control: the minimal call each schema allows is accepted.
        for (name, args) in [
            ("shell", serde_json::json!({"command": "true"})),
            ("run_python", serde_json::json!({"code": "1"})),
            ("read_file", serde_json::json!({"path": "a"})),
            ("list_dir", serde_json::json!({"path": "."})),
        ] {
            ToolCall::parse(name, args).unwrap();
        }
    }

    #[test]
    fn descriptions_quote_the_configured_limits() {
        let shell = tool(&cfg(), "shell").unwrap();
        let c = cfg();
        let default = humantime::format_duration(c.exec_timeout).to_string();
        assert!(
            shell.description.contains(&default),
            "{}",
            shell.description
        );
        // The default backend is the host: the model is not told it is sandboxed.
        assert!(
            shell.description.contains("NOT isolated"),
            "{}",
            shell.description
        );
        let docker =
            Config::from_lookup(|k| (k == "ZCBOT_SANDBOX_BACKEND").then(|| "docker".into()))
                .unwrap();
        let sandboxed = tool(&docker, "shell").unwrap();
        assert!(
            sandboxed.description.contains("no network"),
            "{}",
            sandboxed.description
        );
        assert_eq!(human_bytes(65536), "64 KiB");
        assert_eq!(human_bytes(3 << 20), "3 MiB");
        assert_eq!(human_bytes(1000), "1000 bytes");
    }
}
