//! Warm spares against the real Docker Engine: a new user's first call claims a started spare,
//! which shows that user's folder and no other, before or after; a claim that fails half way
//! leaves no container and no mount; spares and claimed sandboxes survive a restart, a claim cut
//! short does not; a config change replaces them; claims racing the reaper each see their own
//! files; spares count against `ZCBOT_SANDBOX_MAX`. Witnesses: the docker CLI, the host's mount
//! table.

mod common;

use std::os::unix::fs::chown;
use std::time::{Duration, Instant};

use common::{call, docker, docker_executor, docker_try, exec_as, Daemon, TestPool};
use serde_json::json;
use zcbot_sandbox::pool::SandboxPool;
use zcbot_sandbox::user::UserId;

/// Waits until the pool has `n` spares ready.
async fn wait_spares(pool: &SandboxPool, n: usize) {
    let until = Instant::now() + Duration::from_secs(90);
    while pool.spares_ready() != n {
        assert!(
            Instant::now() < until,
            "{} spares ready, not {n}",
            pool.spares_ready()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The names of this pool's unclaimed spares, as the engine lists them.
fn spare_names(t: &TestPool) -> Vec<String> {
    let mut v: Vec<String> = t
        .containers()
        .into_iter()
        .filter(|n| n.starts_with("zcbot-spare-"))
        .collect();
    v.sort();
    v
}

/// What the container shows at `/workspace`, read from the host through its PID 1's root (a
/// spare's slot is mode 000: the container's own root, without capabilities, cannot list it).
fn workspace_of(container: &str) -> Vec<String> {
    let pid = docker(&["inspect", "-f", "{{.State.Pid}}", container]);
    let dir = format!("/proc/{}/root/workspace", pid.trim());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn id_of(container: &str) -> String {
    docker(&["inspect", "-f", "{{.Id}}", container])
        .trim()
        .to_owned()
}

/// Gives `user` a folder holding `me` with the user's id (owned by the tenant's uid).
async fn plant(pool: &SandboxPool, user: &UserId) {
    let folder = pool.prepare_workspace(user).await.unwrap();
    let file = folder.path.join("me");
    std::fs::write(&file, user.as_str()).unwrap();
    chown(&file, Some(folder.uid), Some(folder.gid)).unwrap();
}

/// Host mounts whose mount point is in this pool's workspace slots and whose source is `user`'s
/// folder.
fn slot_mounts_of(t: &TestPool, user: &UserId) -> usize {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let slots = format!("/zcbot-test-{}/state/", t.pool_id);
    let folder = format!("/users/{user}");
    table
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f[4].contains(&slots) && f[3].ends_with(&folder)
        })
        .count()
}

const SHOW: &str = "cat /workspace/me; echo; ls -A /workspace";

#[tokio::test]
async fn a_claimed_spare_shows_its_users_files_and_no_one_elses() {
    let mut t = TestPool::new("spare");
    t.set("ZCBOT_SPARES", "2")
        .set("ZCBOT_SANDBOX_REAP_EVERY", "1s");
    let ex = docker_executor(&t).await;
    let pool = ex.pool().unwrap().clone();
    let reaper = pool.spawn_reaper();
    wait_spares(&pool, 2).await;
    let spares = spare_names(&t);
    assert_eq!(spares.len(), 2, "{spares:?}");
    let spare_ids: Vec<String> = spares.iter().map(|s| id_of(s)).collect();
    // Before any claim a spare's /workspace is empty, and closed even to its own root.
    for s in &spares {
        assert_eq!(workspace_of(s), Vec::<String>::new(), "{s}");
        let (ok, _, err) = exec_as(s, "root", "ls -A /workspace");
        assert!(!ok && err.contains("Permission denied"), "{err}");
    }

    let (a, b) = (t.user("a"), t.user("b"));
    plant(&pool, &a).await;
    plant(&pool, &b).await;
    let ra = call(&ex, &a, "shell", json!({"command": SHOW})).await;
    assert_eq!(ra.stdout, format!("{a}\nme\n"), "{ra:?}");
    let rb = call(&ex, &b, "shell", json!({"command": SHOW})).await;
    assert_eq!(rb.stdout, format!("{b}\nme\n"), "{rb:?}");
    // Both ran on the spares (renamed), none was created for them.
    // The same witness shows each claimed spare with its user's folder (the positive control).
    assert_eq!(workspace_of(&t.container_name(&a)), vec!["me".to_owned()]);
    let (ida, idb) = (id_of(&t.container_name(&a)), id_of(&t.container_name(&b)));
    assert!(spare_ids.contains(&ida) && spare_ids.contains(&idb) && ida != idb);
    let stats = pool.stats();
    assert_eq!(
        (stats.spare_claims, stats.ensures_cold),
        (2, 0),
        "{stats:?}"
    );
    // What the tenant writes lands in its own folder on the host, as its own uid.
    let r = call(
        &ex,
        &a,
        "shell",
        json!({"command": "echo hi > /workspace/new; id -u"}),
    )
    .await;
    let folder = pool.prepare_workspace(&a).await.unwrap();
    assert_eq!(r.stdout.trim(), folder.uid.to_string());
    assert_eq!(
        std::fs::read_to_string(folder.path.join("new")).unwrap(),
        "hi\n"
    );

    // Replacements are made in the background, fresh and empty.
    wait_spares(&pool, 2).await;
    let fresh = spare_names(&t);
    for s in &fresh {
        assert!(
            !spare_ids.contains(&id_of(s)),
            "a claimed spare is a spare again: {s}"
        );
        assert_eq!(workspace_of(s), Vec::<String>::new(), "{s}");
    }

    // Removing a's sandbox releases its slot: a's folder is mounted nowhere any more.
    assert_eq!(
        slot_mounts_of(&t, &a),
        1,
        "the claim's mount is in the host's table"
    );
    assert!(pool.remove(&a).await.unwrap());
    let until = Instant::now() + Duration::from_secs(20);
    while slot_mounts_of(&t, &a) != 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        slot_mounts_of(&t, &a),
        0,
        "a's folder is still mounted in a slot"
    );
    assert_eq!(slot_mounts_of(&t, &b), 1);
    // The next call of a claims a new spare and still sees a's files.
    let ra = call(&ex, &a, "shell", json!({"command": SHOW})).await;
    assert_eq!(ra.stdout, format!("{a}\nme\nnew\n"), "{ra:?}");
    ex.close_channels();
    drop(reaper);
}

/// The exec channel helpers running in `container`, as (uid, host pid), from the host's view of
/// its processes.
fn helpers_in(container: &str) -> Vec<(u32, u32)> {
    docker(&["top", container, "-eo", "uid,pid,args"])
        .lines()
        .filter(|l| l.contains("zcbot-supervise --serve"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap())
        })
        .collect()
}

/// Whom the uid map gives `uid` to (a user, or `spare:<pool>.<token>`), if anyone.
fn uid_holder(t: &TestPool, uid: u32) -> Option<String> {
    std::fs::read_link(t.root.join("state/uids/by-uid").join(uid.to_string()))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

#[tokio::test]
async fn a_brand_new_users_first_call_runs_on_the_helper_waiting_in_its_spare() {
    let mut t = TestPool::new("sparewarm");
    t.set("ZCBOT_SPARES", "1")
        .set("ZCBOT_SANDBOX_REAP_EVERY", "1s");
    let ex = docker_executor(&t).await;
    let pool = ex.pool().unwrap().clone();
    let stats = ex.transport_stats().unwrap().clone();
    let reaper = pool.spawn_reaper();
    wait_spares(&pool, 1).await;
    // The spare waits with one helper, as a uid of its own that no user has yet.
    let spare = spare_names(&t).remove(0);
    let waiting = helpers_in(&spare);
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    let (spare_uid, helper_pid) = waiting[0];
    let holder = uid_holder(&t, spare_uid).unwrap_or_default();
    assert!(holder.starts_with("spare:"), "{holder}");
    assert_eq!(stats.warmed.get(), 1);

    // A brand-new user's first call: the user is given the spare's uid, and the call runs on
    // the helper that was waiting (no other helper is started).
    let fresh = t.user("fresh");
    let r = call(
        &ex,
        &fresh,
        "shell",
        json!({"command": "id -u; pwd; echo hi > f; ls -A"}),
    )
    .await;
    assert_eq!(
        r.stdout,
        format!(
            "{spare_uid}
/workspace
f
"
        ),
        "{r:?}"
    );
    let name = t.container_name(&fresh);
    assert_eq!(helpers_in(&name), vec![(spare_uid, helper_pid)]);
    assert_eq!((stats.warm_taken.get(), stats.opens.get()), (1, 1));
    let folder = pool.prepare_workspace(&fresh).await.unwrap();
    assert_eq!((folder.uid, folder.gid), (spare_uid, spare_uid));
    let owner = std::fs::metadata(folder.path.join("f")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&owner), spare_uid);

    // A returning user (a uid of its own already) claims the next spare: the helper waiting
    // there runs as another uid, so it is ended and the user's own is started.
    wait_spares(&pool, 1).await;
    let spare = spare_names(&t).remove(0);
    let (other_uid, _) = helpers_in(&spare)[0];
    assert_ne!(other_uid, spare_uid);
    let back = t.user("back");
    plant(&pool, &back).await;
    let back_uid = pool.prepare_workspace(&back).await.unwrap().uid;
    let r = call(&ex, &back, "shell", json!({"command": "id -u; cat me"})).await;
    assert_eq!(
        r.stdout,
        format!(
            "{back_uid}
{back}"
        ),
        "{r:?}"
    );
    let name = t.container_name(&back);
    let until = Instant::now() + Duration::from_secs(10);
    while helpers_in(&name).len() != 1 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now: Vec<u32> = helpers_in(&name).into_iter().map(|(u, _)| u).collect();
    assert_eq!(now, vec![back_uid], "the spare's own helper is gone");
    assert_eq!((stats.warm_taken.get(), stats.opens.get()), (1, 2));
    // Once that container is gone, the uid no user took is let go; the one a user took is not.
    assert!(uid_holder(&t, other_uid).is_some_and(|h| h.starts_with("spare:")));
    assert!(pool.remove(&back).await.unwrap());
    let until = Instant::now() + Duration::from_secs(20);
    while uid_holder(&t, other_uid).is_some() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        uid_holder(&t, other_uid),
        None,
        "the unused spare uid is still held"
    );
    assert!(pool.remove(&fresh).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        uid_holder(&t, spare_uid).as_deref(),
        Some(fresh.as_str()),
        "a uid a user had is never let go"
    );
    ex.close_channels();
    drop(reaper);
}

#[tokio::test]
async fn a_claim_failing_half_way_leaves_no_container_and_no_mount() {
    let mut t = TestPool::new("sparefail");
    t.set("ZCBOT_SPARES", "1");
    let ex = docker_executor(&t).await;
    let pool = ex.pool().unwrap().clone();
    let reaper = pool.spawn_reaper();
    wait_spares(&pool, 1).await;
    let spare = spare_names(&t).remove(0);
    // Killed behind the pool's back (the maker looks again only every minute here): the claim
    // mounts the user's folder, then finds the container does not show it.
    docker(&["kill", &spare]);
    let user = t.user("u");
    plant(&pool, &user).await;
    let r = call(&ex, &user, "shell", json!({"command": SHOW})).await;
    assert_eq!(r.stdout, format!("{user}\nme\n"), "{r:?}");
    let stats = pool.stats();
    assert_eq!(
        (
            stats.spare_claims,
            stats.spare_claims_failed,
            stats.ensures_cold
        ),
        (0, 1, 1),
        "the claim did not fail half way: {stats:?}"
    );
    // The spare is gone, its claim record and its mount too; the user's sandbox is a new one.
    let (there, _, _) = docker_try(&["inspect", &spare]);
    assert!(!there, "the failed spare is still there");
    assert_eq!(slot_mounts_of(&t, &user), 0);
    let claims = t.root.join("state").join(&t.pool_id).join("claims");
    assert_eq!(std::fs::read_dir(&claims).unwrap().count(), 0);
    let labels = docker(&[
        "inspect",
        "-f",
        "{{index .Config.Labels \"io.zcbot.user\"}}",
        &t.container_name(&user),
    ]);
    assert_eq!(labels.trim(), user.as_str());
    ex.close_channels();
    drop(reaper);
}

#[tokio::test]
async fn spares_and_claimed_spares_survive_a_restart_but_a_cut_claim_does_not() {
    let mut t = TestPool::new("sparerestart");
    t.set("ZCBOT_SPARES", "2");
    let user = t.user("a");
    let claimed_id;
    let cut;
    {
        let ex = docker_executor(&t).await;
        let pool = ex.pool().unwrap().clone();
        let reaper = pool.spawn_reaper();
        wait_spares(&pool, 2).await;
        plant(&pool, &user).await;
        let r = call(&ex, &user, "shell", json!({"command": SHOW})).await;
        assert_eq!(r.stdout, format!("{user}\nme\n"));
        claimed_id = id_of(&t.container_name(&user));
        wait_spares(&pool, 2).await;
        ex.close_channels();
        drop(reaper);
        // A crash between a claim's record and its rename: the record names a user, the spare
        // still has its spare name.
        // The crash came after the mount: the user's folder is in the spare's slot.
        cut = spare_names(&t).remove(0);
        let victim = t.user("c");
        plant(&pool, &victim).await;
        let claims = t.root.join("state").join(&t.pool_id).join("claims");
        std::fs::write(claims.join(id_of(&cut)), victim.as_str()).unwrap();
        let token = cut.rsplit('.').next().unwrap();
        let slot = t
            .root
            .join("state")
            .join(&t.pool_id)
            .join("slots")
            .join(token);
        let folder = pool.prepare_workspace(&victim).await.unwrap().path;
        let out = std::process::Command::new("mount")
            .args(["--bind", folder.to_str().unwrap(), slot.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            workspace_of(&cut),
            vec!["me".to_owned()],
            "the mount did not arrive"
        );
    }
    let kept = spare_names(&t).into_iter().find(|s| *s != cut).unwrap();
    let kept_id = id_of(&kept);

    // One spare wanted now: the adopted one, and no new one to take its turn.
    t.set("ZCBOT_SPARES", "1");
    let ex = docker_executor(&t).await;
    let pool = ex.pool().unwrap().clone();
    let report = pool.reconcile().await.unwrap();
    assert_eq!(report.adopted, vec![user.to_string()], "{report:?}");
    assert_eq!(report.spares, 1, "{report:?}");
    assert!(
        report
            .removed
            .iter()
            .any(|(n, why)| *n == cut && why.contains("cut short")),
        "{report:?}"
    );
    assert!(
        !docker_try(&["inspect", &cut]).0,
        "the cut claim's spare is still there"
    );
    assert_eq!(
        slot_mounts_of(&t, &t.user("c")),
        0,
        "the cut claim's mount is still there"
    );
    // The claimed sandbox is the same container, with the user's files; the adopted spare
    // serves the next new user.
    let r = call(&ex, &user, "shell", json!({"command": SHOW})).await;
    assert_eq!(r.stdout, format!("{user}\nme\n"));
    assert_eq!(id_of(&t.container_name(&user)), claimed_id);
    let reaper = pool.spawn_reaper();
    // The adopted spare gets a helper of this run before it is offered again (the earlier
    // run's ended with it); a brand-new user runs on it.
    let stats = ex.transport_stats().unwrap().clone();
    let until = Instant::now() + Duration::from_secs(30);
    while stats.warmed.get() == 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats.warmed.get(), 1, "the adopted spare got no helper");
    wait_spares(&pool, 1).await;
    let until = Instant::now() + Duration::from_secs(10);
    while helpers_in(&kept).len() != 1 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (kept_uid, _) = helpers_in(&kept)[0];
    let other = t.user("d");
    let r = call(&ex, &other, "shell", json!({"command": "id -u; ls -A"})).await;
    assert_eq!(r.stdout, format!("{kept_uid}\n"), "{r:?}");
    assert_eq!(id_of(&t.container_name(&other)), kept_id);
    assert_eq!(ex.transport_stats().unwrap().warm_taken.get(), 1);
    ex.close_channels();
    drop(reaper);
}

#[tokio::test]
async fn a_config_change_replaces_spares_and_claimed_spares() {
    let mut t = TestPool::new("sparedrift");
    t.set("ZCBOT_SPARES", "1");
    let user = t.user("a");
    let (old_spare, old_claimed);
    {
        let ex = docker_executor(&t).await;
        let pool = ex.pool().unwrap().clone();
        let reaper = pool.spawn_reaper();
        wait_spares(&pool, 1).await;
        let r = call(&ex, &user, "shell", json!({"command": "true"})).await;
        assert_eq!(r.exit_code, Some(0));
        old_claimed = id_of(&t.container_name(&user));
        wait_spares(&pool, 1).await;
        old_spare = id_of(&spare_names(&t)[0]);
        ex.close_channels();
        drop(reaper);
    }
    t.set("ZCBOT_SANDBOX_MEMORY", "300MiB");
    let ex = docker_executor(&t).await;
    let pool = ex.pool().unwrap().clone();
    let report = pool.reconcile().await.unwrap();
    assert!(report.adopted.is_empty(), "{report:?}");
    assert_eq!(report.spares, 0, "{report:?}");
    assert_eq!(report.removed.len(), 2, "{report:?}");
    assert!(
        report.removed.iter().all(|(_, why)| why.contains("stale")),
        "{report:?}"
    );
    let reaper = pool.spawn_reaper();
    wait_spares(&pool, 1).await;
    let spare = spare_names(&t).remove(0);
    assert_ne!(id_of(&spare), old_spare);
    let memory = docker(&["inspect", "-f", "{{.HostConfig.Memory}}", &spare]);
    assert_eq!(memory.trim(), (300u64 << 20).to_string());
    let r = call(&ex, &user, "shell", json!({"command": "true"})).await;
    assert_eq!(r.exit_code, Some(0));
    assert_ne!(id_of(&t.container_name(&user)), old_claimed);
    ex.close_channels();
    drop(reaper);
}

#[tokio::test]
async fn claims_racing_the_reaper_each_see_their_own_files() {
    let mut t = TestPool::new("sparerace");
    t.set("ZCBOT_SPARES", "3")
        .set("ZCBOT_SANDBOX_IDLE", "1s")
        .set("ZCBOT_SANDBOX_REAP_EVERY", "1s")
        .set("ZCBOT_SANDBOX_PAUSE_AFTER", "0");
    let ex = docker_executor(&t).await;
    let pool = ex.pool().unwrap().clone();
    let reaper = pool.spawn_reaper();
    wait_spares(&pool, 3).await;
    let users: Vec<UserId> = (0..4).map(|i| t.user(&format!("r{i}"))).collect();
    for u in &users {
        plant(&pool, u).await;
    }
    // Each user calls again and again for at least 8 s, waiting about as long as the idle limit
    // between calls: its sandbox is reaped now and then, and its next call claims a spare, while
    // the reaper removes other users' sandboxes and the maker makes spares. Whether a given wait
    // outlasts the idle limit is up to where the reaper's tick falls, so the calls go on (up to
    // 60 s) until a few sandboxes were reaped and claimed again, rather than for a fixed time
    // that a slow or lucky run spends without one reap.
    let start = Instant::now();
    let raced = || {
        let s = pool.stats();
        s.spare_claims >= 6 && s.reaped >= 2
    };
    let going = || {
        let t = start.elapsed();
        t < Duration::from_secs(8) || (t < Duration::from_secs(60) && !raced())
    };
    let outs = futures_util::future::join_all(users.iter().enumerate().map(|(i, u)| {
        let ex = &ex;
        let going = &going;
        async move {
            let mut calls = 0;
            while going() {
                let r = call(ex, u, "shell", json!({"command": "cat /workspace/me"})).await;
                assert_eq!(r.stdout, u.as_str(), "{r:?}");
                calls += 1;
                tokio::time::sleep(Duration::from_millis(900 + 200 * i as u64)).await;
            }
            calls
        }
    }))
    .await;
    assert!(outs.iter().all(|n| *n >= 3), "{outs:?}");
    // Claims after the first four: sandboxes were reaped between calls and claimed again.
    let stats = pool.stats();
    assert!(stats.spare_claims >= 6, "{stats:?}");
    assert!(stats.reaped >= 2, "{stats:?}");
    // Once every user's sandbox is gone, no user's folder stays mounted in a slot.
    let until = Instant::now() + Duration::from_secs(30);
    while users.iter().any(|u| slot_mounts_of(&t, u) != 0) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for u in &users {
        assert_eq!(slot_mounts_of(&t, u), 0, "{u} still mounted");
    }
    ex.close_channels();
    drop(reaper);
}

#[tokio::test]
async fn spares_count_against_the_pool_limit() {
    let mut t = TestPool::new("sparemax");
    t.set("ZCBOT_SPARES", "2").set("ZCBOT_SANDBOX_MAX", "2");
    let ex = docker_executor(&t).await;
    let pool = ex.pool().unwrap().clone();
    let reaper = pool.spawn_reaper();
    wait_spares(&pool, 2).await;
    let (a, b, c) = (t.user("a"), t.user("b"), t.user("c"));
    for u in [&a, &b] {
        let r = call(&ex, u, "shell", json!({"command": "true"})).await;
        assert_eq!(r.exit_code, Some(0));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(t.containers().len() <= 2, "{:?}", t.containers());
    }
    // Both places are users' now: no spare is made, and a third user evicts an idle one.
    assert_eq!(pool.spares_ready(), 0);
    let r = call(&ex, &c, "shell", json!({"command": "true"})).await;
    assert_eq!(r.exit_code, Some(0));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(t.containers().len(), 2, "{:?}", t.containers());
    let stats = pool.stats();
    assert_eq!((stats.spare_claims, stats.reaped), (2, 1), "{stats:?}");
    ex.close_channels();
    drop(reaper);
}

/// A restart with the pool full of spares: the startup self-check (whose probe never claims a
/// spare) takes a spare's place instead of finding the pool full.
#[tokio::test]
async fn a_restart_at_the_limit_gives_a_spares_place_to_the_self_check() {
    let mut t = TestPool::new("sparefull");
    t.set("ZCBOT_SPARES", "2")
        .set("ZCBOT_SANDBOX_MAX", "2")
        .set("ZCBOT_SANDBOX_BACKEND", "docker")
        .set("ZCBOT_LISTEN", "127.0.0.1:0")
        .set("ZCBOT_SELF_CHECK", "1");
    for start in 0..2 {
        let (child, addr) = common::spawn_daemon(t.env());
        let d = Daemon { child, addr };
        let until = Instant::now() + Duration::from_secs(90);
        loop {
            let (_, _, body) = common::http(&d.addr, "GET", "/v1/sandboxes", None).await;
            let list: serde_json::Value = serde_json::from_str(&body).unwrap();
            let spares = list
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["spare"] == true)
                .count();
            if spares == 2 {
                break;
            }
            assert!(Instant::now() < until, "start {start}: {list}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if start == 1 {
            let user = t.user("a");
            let (status, r) = d.tool(&user, "shell", json!({"command": "echo hi"})).await;
            assert_eq!((status, r["stdout"].as_str()), (200, Some("hi\n")), "{r}");
        }
    }
}

/// A pool that makes no spare (`ZCBOT_SPARES=0`) leaves no mount on the host: the slot folder
/// becomes a mount only before a first slot.
#[tokio::test]
async fn a_pool_without_spares_mounts_nothing() {
    let t = TestPool::new("nospare");
    let ex = docker_executor(&t).await;
    let pool = ex.pool().unwrap().clone();
    let reaper = pool.spawn_reaper();
    let user = t.user("a");
    let r = call(&ex, &user, "shell", json!({"command": "echo hi"})).await;
    assert_eq!(r.stdout, "hi\n");
    assert_eq!(pool.spares_ready(), 0);
    let state = format!("/zcbot-test-{}/", t.pool_id);
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !table.lines().any(|l| l.contains(&state)),
        "a mount of this pool's state is on the host:\n{table}"
    );
    ex.close_channels();
    drop(reaper);
}
