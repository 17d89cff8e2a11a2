//! The file tools' confinement, on a real folder, with both resolution strategies (openat2 and
//! the O_NOFOLLOW walk used where the kernel lacks openat2).

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use zcbot_sandbox::files::{Budget, Workspace};

/// A generous budget for one call.
fn b() -> Budget {
    Budget::new(std::time::Duration::from_secs(30), 1_000_000)
}

struct Scene {
    base: PathBuf,
    ws: PathBuf,
    outside: PathBuf,
}

impl Scene {
    fn new(tag: &str) -> Self {
        let base = std::env::temp_dir().join(format!("zcbot-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let ws = base.join("users").join("alice");
        let outside = base.join("outside");
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "host secret").unwrap();
        Scene { base, ws, outside }
    }

    fn workspaces(&self) -> [Workspace; 2] {
        let (uid, gid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        [
            Workspace::new(self.ws.clone(), uid, gid),
            Workspace::new(self.ws.clone(), uid, gid).with_fallback(),
        ]
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Refused as leaving the workspace or naming what the tools never touch (403 `path_refused`).
fn refused(r: zcbot_sandbox::Result<impl std::fmt::Debug>, what: &str) {
    fails_as(r, "path_refused", what);
}

fn fails_as(r: zcbot_sandbox::Result<impl std::fmt::Debug>, kind: &str, what: &str) {
    match r {
        Ok(v) => panic!("{what}: allowed, got {v:?}"),
        Err(e) => assert_eq!(e.kind(), kind, "{what}: {e}"),
    }
}

#[test]
fn reads_writes_lists_and_deletes_inside_the_workspace() {
    let s = Scene::new("basic");
    for ws in s.workspaces() {
        assert_eq!(
            ws.write_file("a/b/c.txt", b"hello world", false).unwrap(),
            11
        );
        assert_eq!(
            ws.write_file("/workspace/a/b/c.txt", b"!", true).unwrap(),
            1
        );
        let r = ws.read_file("a/b/c.txt", 6, 100).unwrap();
        assert_eq!((r.content.as_str(), r.size, r.eof), ("world!", 12, true));
        let r = ws.read_file("a/b/c.txt", 0, 5).unwrap();
        assert_eq!(
            (r.content.as_str(), r.bytes_read, r.eof),
            ("hello", 5, false)
        );
        let names: Vec<_> = ws
            .list_dir("a", &mut b())
            .unwrap()
            .entries
            .into_iter()
            .map(|e| (e.name, e.kind))
            .collect();
        assert_eq!(names, vec![("b".to_owned(), "dir".to_owned())]);
        ws.delete_path("a", &mut b()).unwrap();
        assert!(!s.ws.join("a").exists());
        refused(
            ws.delete_path(".", &mut b()),
            "deleting the workspace itself",
        );
        refused(
            ws.delete_path("/workspace", &mut b()),
            "deleting the workspace itself",
        );
    }
}

#[test]
fn dot_dot_and_absolute_paths_never_leave_the_workspace() {
    let s = Scene::new("dotdot");
    for ws in s.workspaces() {
        refused(ws.read_file("../../outside/secret", 0, 100), "read ..");
        refused(ws.read_file("/etc/passwd", 0, 100), "read absolute");
        refused(ws.write_file("../evil", b"x", false), "write ..");
        refused(ws.list_dir("../..", &mut b()), "list ..");
        refused(ws.delete_path("../../outside", &mut b()), "delete ..");
        assert!(!s.base.join("users").join("evil").exists());
        assert!(s.outside.join("secret").exists());
    }
}

#[test]
fn symlinks_planted_by_the_user_are_never_followed_out() {
    let s = Scene::new("links");
    // What a sandbox user can plant in its own folder.
    symlink(s.outside.join("secret"), s.ws.join("abs-file")).unwrap();
    symlink(&s.outside, s.ws.join("abs-dir")).unwrap();
    symlink("../../outside", s.ws.join("rel-dir")).unwrap();
    std::fs::create_dir(s.ws.join("mid")).unwrap();
    symlink("../../../outside", s.ws.join("mid").join("up")).unwrap();
    symlink("/", s.ws.join("root")).unwrap();
    for ws in s.workspaces() {
        for path in [
            "abs-file",
            "abs-dir/secret",
            "rel-dir/secret",
            "mid/up/secret",
            "root/etc/passwd",
        ] {
            refused(ws.read_file(path, 0, 100), &format!("read {path}"));
        }
        for path in ["abs-dir", "rel-dir", "mid/up", "root"] {
            refused(ws.list_dir(path, &mut b()), &format!("list {path}"));
        }
        for path in [
            "abs-file",
            "abs-dir/new",
            "rel-dir/new",
            "mid/up/new",
            "root/tmp/zcbot-pwned",
        ] {
            refused(
                ws.write_file(path, b"pwned", false),
                &format!("write {path}"),
            );
        }
        for path in ["abs-dir/secret", "rel-dir/secret", "mid/up/secret"] {
            refused(ws.delete_path(path, &mut b()), &format!("delete {path}"));
        }
        assert_eq!(
            std::fs::read_to_string(s.outside.join("secret")).unwrap(),
            "host secret"
        );
        assert!(!s.outside.join("new").exists());
        assert!(!Path::new("/tmp/zcbot-pwned").exists());
        // Listing shows the links as links.
        let kinds: Vec<_> = ws
            .list_dir(".", &mut b())
            .unwrap()
            .entries
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert!(
            kinds.iter().filter(|k| *k == "symlink").count() >= 4,
            "{kinds:?}"
        );
    }
}

#[test]
fn deleting_a_link_or_a_folder_holding_one_removes_only_what_is_inside() {
    let s = Scene::new("del");
    for ws in s.workspaces() {
        symlink(&s.outside, s.ws.join("link")).unwrap();
        std::fs::create_dir_all(s.ws.join("tree/sub")).unwrap();
        symlink(&s.outside, s.ws.join("tree/sub/inner-link")).unwrap();
        std::fs::write(s.ws.join("tree/sub/f"), "x").unwrap();
        ws.delete_path("link", &mut b()).unwrap();
        ws.delete_path("tree", &mut b()).unwrap();
        assert!(!s.ws.join("link").exists() && !s.ws.join("tree").exists());
        assert_eq!(
            std::fs::read_to_string(s.outside.join("secret")).unwrap(),
            "host secret"
        );
    }
}

#[test]
fn symlinks_inside_the_workspace_still_work_with_openat2() {
    let s = Scene::new("inner");
    std::fs::create_dir(s.ws.join("real")).unwrap();
    std::fs::write(s.ws.join("real/f"), "inside").unwrap();
    symlink("real", s.ws.join("alias")).unwrap();
    let [ws, fallback] = s.workspaces();
    assert_eq!(ws.read_file("alias/f", 0, 100).unwrap().content, "inside");
    // The fallback refuses every symlink: stricter, never looser.
    refused(
        fallback.read_file("alias/f", 0, 100),
        "fallback through a link",
    );
}

#[test]
fn binary_files_come_back_losslessly_and_non_files_are_refused() {
    let s = Scene::new("bin");
    std::fs::write(s.ws.join("b"), [0xffu8, 0x00, b'a']).unwrap();
    nix::unistd::mkfifo(
        &s.ws.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    for ws in s.workspaces() {
        let r = ws.read_file("b", 0, 10).unwrap();
        assert_eq!(r.content_base64.as_deref(), Some("/wBh"));
        refused(ws.read_file("fifo", 0, 10), "read a fifo");
        fails_as(ws.read_file(".", 0, 10), "file", "read a folder");
        fails_as(ws.read_file("a\0b", 0, 10), "file", "NUL in a path");
    }
}

#[test]
fn each_failure_has_its_class_and_changes_nothing() {
    let s = Scene::new("classes");
    std::fs::write(s.ws.join("f"), "keep").unwrap();
    std::fs::create_dir(s.ws.join("d")).unwrap();
    symlink("f", s.ws.join("link-to-f")).unwrap();
    for ws in s.workspaces() {
        // Missing: 404 not_found, whichever tool asks.
        fails_as(
            ws.read_file("nope", 0, 10),
            "not_found",
            "read a missing file",
        );
        fails_as(
            ws.list_dir("nope", &mut b()),
            "not_found",
            "list a missing folder",
        );
        fails_as(
            ws.delete_path("nope/x", &mut b()),
            "not_found",
            "delete under a missing folder",
        );
        // The wrong kind of thing: 400 file.
        fails_as(
            ws.read_file("f/x", 0, 10),
            "file",
            "a file used as a folder",
        );
        fails_as(
            ws.write_file("d", b"x", false),
            "file",
            "write over a folder",
        );
        // A write never goes through a final symlink, even one that stays inside.
        refused(
            ws.write_file("link-to-f", b"x", false),
            "write through a link",
        );
        assert_eq!(std::fs::read_to_string(s.ws.join("f")).unwrap(), "keep");
        assert!(s.ws.join("d").is_dir());
    }
}
