//! The OpenAPI 3.1 document of the HTTP API (`GET /openapi.json`).
//!
//! Generated from the code: each route's handler carries its operation (`#[utoipa::path]`), the
//! router is built from those handlers (`utoipa_axum`), and the bodies are the library's own
//! serde types. What this module adds is what no single handler knows: the document's header,
//! the bearer scheme (required exactly when the daemon has a token), the error answers every
//! route can give, and the request bodies of the tool routes (the tool's arguments plus
//! `call_id`).

use std::borrow::Cow;

use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{Object, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoParams, PartialSchema, ToSchema};

use crate::exec::{PathArgs, PythonArgs, ReadFileArgs, ShellArgs, WriteFileArgs};

/// The document's header and the schemas no route names by itself.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "zcbot-sandbox",
        description = "One long-lived, hardened container per chat-agent user: run its shell and \
                       Python tool calls inside it, its file tools against the same folder \
                       (/workspace). Every error answers `{\"error\": {\"kind\", \"message\"}}`; \
                       `kind` is stable, the message is for people.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    tags(
        (name = "tools", description = "Tool calls, run as the user they name"),
        (name = "jobs", description = "Background jobs: calls that run on after their request"),
        (name = "sessions", description = "Long-lived Python interpreters"),
        (name = "files", description = "Whole files in and out of the user's folder"),
        (name = "sandboxes", description = "The pool of containers"),
        (name = "egress", description = "Per-user host allowlists (ZCBOT_SANDBOX_EGRESS=allowlist)"),
        (name = "service", description = "Health, readiness, metrics, this document"),
    )
)]
pub(super) struct ApiDoc;

/// Every error the API answers.
#[derive(serde::Serialize, ToSchema)]
pub(super) struct ErrorBody {
    pub(super) error: ErrorDetail,
}

/// What went wrong.
#[derive(serde::Serialize, ToSchema)]
pub(super) struct ErrorDetail {
    /// A stable, machine-readable name (`bad_call`, `not_found`, `too_many_calls`, ...).
    pub(super) kind: String,
    /// What happened and what to do, for people.
    pub(super) message: String,
}

/// The `{user}` of every per-user route.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Read by the document, never constructed: the handlers take `Path<String>`.
pub(super) struct UserPath {
    /// The user: 1 to 63 of `a-z`, `0-9`, `_` and `-`, starting with a letter or digit.
    #[param(pattern = r"^[a-z0-9][a-z0-9_-]{0,62}$")]
    user: String,
}

/// The `stream` switch of the routes that can answer as Server-Sent Events.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // As `UserPath`: the handlers read the raw query.
pub(super) struct StreamQuery {
    /// Answer as Server-Sent Events (as `Accept: text/event-stream` does). `1` and `0` are
    /// taken too.
    stream: Option<bool>,
}

/// The `call_id` a tool call may carry, as `valid_call_id` checks it.
fn call_id_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(64))
        .pattern(Some(r"^[A-Za-z0-9._-]{1,64}$"))
        .description(Some(
            "Your id for the call (unique: a cancel for an id that just ended waits a moment and \
             would stop the next call to take it): cancel it with \
             DELETE /v1/users/{user}/calls/{call_id} (a cancel waits a moment for a call still \
             on its way), or, with background, the job's id. A new one is made when it is missing.",
        ))
        .build()
}

/// A tool's arguments with `call_id` added: the body of its route.
fn with_call_id(args: RefOr<Schema>) -> RefOr<Schema> {
    match args {
        RefOr::T(Schema::Object(mut obj)) => {
            obj.properties
                .insert("call_id".into(), RefOr::T(Schema::Object(call_id_schema())));
            obj.title = None;
            RefOr::T(Schema::Object(obj))
        }
        other => other,
    }
}

/// Declares the body type of one tool route: its arguments plus `call_id`.
macro_rules! call_body {
    ($name:ident, $args:ty) => {
        #[doc = concat!("The body of the `", stringify!($args), "` route.")]
        pub(super) struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                with_call_id(<$args as PartialSchema>::schema())
            }
        }

        impl ToSchema for $name {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }

            fn schemas(out: &mut Vec<(String, RefOr<Schema>)>) {
                <$args as ToSchema>::schemas(out);
            }
        }
    };
}

call_body!(ShellCall, ShellArgs);
call_body!(PythonCall, PythonArgs);
call_body!(ReadFileCall, ReadFileArgs);
call_body!(WriteFileCall, WriteFileArgs);
call_body!(PathCall, PathArgs);

/// The statuses every route can answer whatever it is asked: a wrong or missing token, a daemon
/// out of connections or shutting down, an error on the host.
const EVERY_ROUTE: &[(&str, &str)] = &[
    (
        "401",
        "Missing or wrong token (`unauthorized`); the answer names the scheme in WWW-Authenticate",
    ),
    (
        "500",
        "An error on the host, not the caller's (`io`); the message says what failed",
    ),
    (
        "503",
        "The daemon cannot serve it now: shutting down, out of connections, Docker unreachable, \
         the pool full; retry later",
    ),
];

/// Finishes the document for a daemon: the error answers every route can give (unless the route
/// says more precisely) and, with a token, the bearer scheme every route requires.
pub(super) fn finish(mut doc: OpenApi, token: bool) -> OpenApi {
    let error = || {
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("ErrorBody")))
            .build()
    };
    for item in doc.paths.paths.values_mut() {
        for op in operations(item) {
            for (status, text) in EVERY_ROUTE {
                if *status == "401" && !token {
                    continue;
                }
                op.responses
                    .responses
                    .entry((*status).to_owned())
                    .or_insert_with(|| {
                        RefOr::T(
                            ResponseBuilder::new()
                                .description(*text)
                                .content("application/json", error())
                                .build(),
                        )
                    });
            }
        }
    }
    if token {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("ZCBOT_API_TOKEN"))
                    .build(),
            ),
        );
        doc.security = Some(vec![SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
    doc
}

fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.patch.as_mut(),
        item.head.as_mut(),
        item.options.as_mut(),
        item.trace.as_mut(),
    ]
    .into_iter()
    .flatten()
}
