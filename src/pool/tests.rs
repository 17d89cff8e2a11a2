//! The pool's state machine and admission on the fake engine: no dockerd, a few milliseconds each.

use std::sync::Arc;
use std::time::Duration;

use super::spec::{LABEL_CONFIG_HASH, LABEL_MANAGED_BY, LABEL_POOL, LABEL_USER, MANAGED_BY};
use super::*;
use crate::engine::{ContainerSpec, Engine, FakeEngine, Op};

/// A folder removed when the test ends.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("zcbot-unit-{}", crate::text::random_id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A pool config for the fake engine: its own users and state folders, entry-mode rules.
pub(crate) fn config(dir: &TempDir, extra: &[(&str, &str)]) -> Config {
    let root = dir.0.join("users");
    let state = dir.0.join("state");
    let pool_id = format!("u{}", &crate::text::random_id()[..8]);
    let fixed: Vec<(String, String)> = vec![
        ("ZCBOT_USERS_ROOT".into(), root.display().to_string()),
        ("ZCBOT_STATE_DIR".into(), state.display().to_string()),
        ("ZCBOT_POOL_ID".into(), pool_id),
        ("ZCBOT_CONTAINER_RULES".into(), "entry".into()),
        ("ZCBOT_SANDBOX_BACKEND".into(), "docker".into()),
        ("ZCBOT_SANDBOX_START_TIMEOUT".into(), "2s".into()),
    ];
    let extra: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::from_lookup(|k| {
        extra
            .iter()
            .chain(&fixed)
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    })
    .unwrap()
}

/// A fake engine with the sandbox image, whose containers' entries report ready.
pub(crate) fn engine() -> FakeEngine {
    let fake = FakeEngine::new();
    fake.add_image("zcbot-sandbox:latest");
    fake.entry_line(Some(spec::READY_MARKER));
    fake
}

pub(crate) async fn pool_on(fake: &FakeEngine, config: Config) -> SandboxPool {
    SandboxPool::open(config, Arc::new(fake.clone()), false)
        .await
        .unwrap()
}

async fn pool(extra: &[(&str, &str)]) -> (SandboxPool, FakeEngine, TempDir) {
    let dir = TempDir::new();
    let fake = engine();
    let pool = pool_on(&fake, config(&dir, extra)).await;
    (pool, fake, dir)
}

fn user(name: &str) -> UserId {
    UserId::parse(name).unwrap()
}

#[tokio::test]
async fn a_warm_lease_asks_the_engine_nothing() {
    let (pool, fake, _dir) = pool(&[]).await;
    let alice = user("alice");
    let first = pool.lease(&alice).await.unwrap();
    assert_eq!(fake.containers(), vec![(pool.container_name(&alice), true)]);
    drop(first);
    let before = fake.calls();
    let again = pool.lease(&alice).await.unwrap();
    assert_eq!(fake.calls(), before, "a warm lease made an engine call");
    assert_eq!(pool.stats().ensures_cold, 1);
    assert_eq!(pool.stats().ensures_warm, 1);
    drop(again);
}

#[tokio::test]
async fn at_capacity_the_least_recently_used_idle_sandbox_is_evicted() {
    let (pool, fake, _dir) = pool(&[("ZCBOT_SANDBOX_MAX", "2")]).await;
    let (a, b, c) = (user("a"), user("b"), user("c"));
    drop(pool.lease(&a).await.unwrap());
    drop(pool.lease(&b).await.unwrap());
    let _c = pool.lease(&c).await.unwrap();
    let names: Vec<String> = fake.containers().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        vec![pool.container_name(&b), pool.container_name(&c)]
    );
    assert_eq!(pool.stats().reaped, 1);
}

#[tokio::test]
async fn a_full_pool_of_busy_sandboxes_refuses_and_keeps_no_state_for_the_refused() {
    let (pool, fake, _dir) = pool(&[("ZCBOT_SANDBOX_MAX", "1")]).await;
    let _busy = pool.lease(&user("a")).await.unwrap();
    let err = pool.lease(&user("b")).await.err().expect("pool full");
    assert_eq!(err.kind(), "pool_full");
    assert_eq!(fake.containers().len(), 1, "b got a container anyway");
    assert_eq!(pool.slot_count(), 1, "the refused user left a slot behind");
}

#[tokio::test]
async fn removing_sandboxes_of_unknown_users_leaves_no_state() {
    let (pool, _fake, _dir) = pool(&[]).await;
    for i in 0..50 {
        assert!(!pool.remove(&user(&format!("nobody{i}"))).await.unwrap());
    }
    assert_eq!(pool.slot_count(), 0);
}

#[tokio::test]
async fn a_vanished_container_is_recreated_after_invalidate() {
    let (pool, fake, _dir) = pool(&[]).await;
    let alice = user("alice");
    let first = pool.lease(&alice).await.unwrap().sandbox().clone();
    fake.vanish(&first.name);
    pool.invalidate(&alice, &first.container_id);
    let second = pool.lease(&alice).await.unwrap().sandbox().clone();
    assert_ne!(first.container_id, second.container_id);
    assert_eq!(fake.churn().0, 2);
}

#[tokio::test]
async fn a_stopped_container_is_started_again_not_recreated() {
    let (pool, fake, _dir) = pool(&[]).await;
    let alice = user("alice");
    let first = pool.lease(&alice).await.unwrap().sandbox().clone();
    fake.stop(&first.name);
    pool.invalidate(&alice, &first.container_id);
    let second = pool.lease(&alice).await.unwrap().sandbox().clone();
    assert_eq!(first.container_id, second.container_id);
    assert_eq!(fake.churn(), (1, 0));
}

#[tokio::test]
async fn a_container_with_a_stale_config_hash_is_recreated() {
    let (pool, fake, _dir) = pool(&[]).await;
    let alice = user("alice");
    let name = pool.container_name(&alice);
    let labels = HashMap::from([
        (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
        (LABEL_POOL.to_owned(), pool.config().pool_id.clone()),
        (LABEL_USER.to_owned(), "alice".to_owned()),
        (LABEL_CONFIG_HASH.to_owned(), "stale".to_owned()),
    ]);
    let spec = ContainerSpec {
        labels: Some(labels),
        ..Default::default()
    };
    fake.create(&name, &spec).await.unwrap();
    let sandbox = pool.lease(&alice).await.unwrap().sandbox().clone();
    assert_eq!(fake.churn(), (2, 1), "the stale container was not replaced");
    assert_ne!(sandbox.config_hash, "stale");
}

#[tokio::test]
async fn a_container_of_that_name_not_ours_is_left_alone() {
    let (pool, fake, _dir) = pool(&[]).await;
    let alice = user("alice");
    let name = pool.container_name(&alice);
    fake.create(&name, &ContainerSpec::default()).await.unwrap();
    let err = pool.lease(&alice).await.err().expect("refused");
    assert_eq!(err.kind(), "sandbox_start");
    assert!(err.to_string().contains("did not create"), "{err}");
    assert_eq!(fake.churn(), (1, 0));
}

#[tokio::test]
async fn an_entry_that_never_reports_ready_fails_and_leaves_nothing() {
    let (pool, fake, _dir) = pool(&[("ZCBOT_SANDBOX_START_TIMEOUT", "200ms")]).await;
    fake.entry_line(None);
    let err = pool
        .lease(&user("alice"))
        .await
        .err()
        .expect("no ready line");
    assert_eq!(err.kind(), "sandbox_start");
    assert!(
        err.to_string().contains("ZCBOT_SANDBOX_START_TIMEOUT"),
        "{err}"
    );
    assert!(
        fake.containers().is_empty(),
        "a half-started sandbox is left"
    );
    assert_eq!(pool.slot_count(), 0);
}

#[tokio::test]
async fn an_engine_failure_names_the_operation() {
    let (pool, fake, _dir) = pool(&[]).await;
    fake.fail(Op::Create);
    let err = pool
        .lease(&user("alice"))
        .await
        .err()
        .expect("create fails");
    assert_eq!(err.kind(), "docker");
    assert!(
        matches!(
            &err,
            Error::Engine(crate::engine::EngineError::Failed { op: Op::Create, .. })
        ),
        "{err:?}"
    );
    fake.heal();
    pool.lease(&user("alice")).await.unwrap();
}

#[tokio::test]
async fn a_missing_image_is_refused_at_open() {
    let dir = TempDir::new();
    let fake = FakeEngine::new();
    let err = SandboxPool::open(config(&dir, &[]), Arc::new(fake), false)
        .await
        .err()
        .expect("no image");
    assert_eq!(err.kind(), "image_missing");
}

#[tokio::test]
async fn reconcile_adopts_current_sandboxes_and_removes_stopped_ones() {
    let dir = TempDir::new();
    let fake = engine();
    let config = config(&dir, &[]);
    let first = pool_on(&fake, config.clone()).await;
    let (a, b) = (user("a"), user("b"));
    drop(first.lease(&a).await.unwrap());
    drop(first.lease(&b).await.unwrap());
    fake.stop(&first.container_name(&b));
    drop(first);

    let second = pool_on(&fake, config).await;
    let report = second.reconcile().await.unwrap();
    assert_eq!(report.adopted, vec!["a".to_owned()]);
    assert_eq!(report.removed.len(), 1, "{report:?}");
    assert_eq!(fake.containers(), vec![(second.container_name(&a), true)]);
    let before = fake.calls();
    drop(second.lease(&a).await.unwrap());
    assert_eq!(fake.calls(), before, "the adopted sandbox was not warm");
}

#[tokio::test]
async fn the_reaper_removes_idle_sandboxes_never_leased_ones() {
    let (pool, fake, _dir) = pool(&[]).await;
    let (idle, busy) = (user("idle"), user("busy"));
    drop(pool.lease(&idle).await.unwrap());
    let _held = pool.lease(&busy).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let reaped = pool.reap_idle(Duration::from_millis(10)).await.unwrap();
    assert_eq!(reaped, vec!["idle".to_owned()]);
    assert_eq!(fake.containers(), vec![(pool.container_name(&busy), true)]);
    pool.prune_slots();
    assert_eq!(pool.slot_count(), 1);
}

#[tokio::test]
async fn recycle_is_by_id_and_spares_a_replacement() {
    let (pool, fake, _dir) = pool(&[]).await;
    let alice = user("alice");
    let old = pool.lease(&alice).await.unwrap().sandbox().clone();
    fake.vanish(&old.name);
    pool.invalidate(&alice, &old.container_id);
    let new = pool.lease(&alice).await.unwrap().sandbox().clone();
    assert!(!pool.recycle(&alice, &old.container_id).await.unwrap());
    assert_eq!(fake.containers(), vec![(new.name.clone(), true)]);
    assert_eq!(pool.stats().recycled, 0);
}

#[tokio::test]
async fn idle_sandboxes_are_paused_busy_ones_never_and_a_lease_resumes_them() {
    let (pool, fake, _dir) = pool(&[]).await;
    let (idle, busy) = (user("idle"), user("busy"));
    drop(pool.lease(&idle).await.unwrap());
    let held = pool.lease(&busy).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let paused = pool.pause_idle(Duration::from_millis(10)).await.unwrap();
    assert_eq!(paused, vec!["idle".to_owned()]);
    let running = |name: &str| {
        fake.containers()
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
    };
    assert!(!running(&pool.container_name(&idle)));
    assert!(running(&pool.container_name(&busy)));
    // A paused sandbox is not paused again; the next lease thaws it and says so.
    drop(held);
    assert_eq!(
        pool.pause_idle(Duration::ZERO).await.unwrap(),
        vec!["busy".to_owned()]
    );
    let lease = pool.lease(&idle).await.unwrap();
    assert!(running(&pool.container_name(&idle)));
    assert_eq!(pool.stats().resumed, 1);
    assert_eq!(
        pool.stats().ensures_cold,
        2,
        "resuming is not a new sandbox"
    );
    drop(lease);
    let before = fake.calls();
    drop(pool.lease(&idle).await.unwrap());
    assert_eq!(fake.calls(), before, "a resumed sandbox is warm again");
}

#[tokio::test]
async fn at_capacity_a_paused_sandbox_is_evicted_before_a_running_idle_one() {
    let (pool, fake, _dir) = pool(&[("ZCBOT_SANDBOX_MAX", "2")]).await;
    let (a, b, c) = (user("a"), user("b"), user("c"));
    drop(pool.lease(&a).await.unwrap());
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(pool.lease(&b).await.unwrap());
    // b is the more recently used, but paused: it goes first.
    assert_eq!(
        pool.pause_idle(Duration::ZERO).await.unwrap(),
        vec!["a".to_owned(), "b".to_owned()]
    );
    drop(pool.lease(&a).await.unwrap()); // resumed: a runs again
    let _c = pool.lease(&c).await.unwrap();
    let names: Vec<String> = fake.containers().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        vec![pool.container_name(&a), pool.container_name(&c)]
    );
}

#[tokio::test]
async fn reconcile_resumes_and_adopts_a_paused_sandbox() {
    let dir = TempDir::new();
    let fake = engine();
    let config = config(&dir, &[]);
    let first = pool_on(&fake, config.clone()).await;
    let a = user("a");
    drop(first.lease(&a).await.unwrap());
    assert_eq!(first.pause_idle(Duration::ZERO).await.unwrap(), vec!["a"]);
    drop(first);

    let second = pool_on(&fake, config).await;
    let report = second.reconcile().await.unwrap();
    assert_eq!(report.adopted, vec!["a".to_owned()], "{report:?}");
    assert_eq!(fake.containers(), vec![(second.container_name(&a), true)]);
}

#[tokio::test]
async fn a_pool_that_finds_a_paused_sandbox_thaws_it_rather_than_replacing_it() {
    let dir = TempDir::new();
    let fake = engine();
    let config = config(&dir, &[]);
    let first = pool_on(&fake, config.clone()).await;
    let a = user("a");
    drop(first.lease(&a).await.unwrap());
    first.pause_idle(Duration::ZERO).await.unwrap();
    let churn = fake.churn();
    // A pool that knows nothing of it (a one-shot command) leases it: thawed, same container.
    let second = pool_on(&fake, config.clone()).await;
    drop(second.lease(&a).await.unwrap());
    assert_eq!(fake.churn(), churn, "the paused sandbox was replaced");
    assert_eq!(fake.containers(), vec![(second.container_name(&a), true)]);
    // The one-shot load for `reap` adopts a paused sandbox too (thawed), so it can be reaped.
    second.pause_idle(Duration::ZERO).await.unwrap();
    let third = pool_on(&fake, config).await;
    assert_eq!(third.adopt_running().await.unwrap().adopted, vec!["a"]);
    assert_eq!(
        third.reap_idle(Duration::ZERO).await.unwrap(),
        vec!["a".to_owned()]
    );
}

#[tokio::test]
async fn a_failed_pause_stays_marked_and_the_next_lease_thaws() {
    let (pool, fake, _dir) = pool(&[]).await;
    let a = user("a");
    drop(pool.lease(&a).await.unwrap());
    fake.fail(Op::Pause);
    assert!(pool.pause_idle(Duration::ZERO).await.is_err());
    fake.heal();
    let before = fake.calls();
    drop(pool.lease(&a).await.unwrap());
    assert!(
        fake.calls() > before,
        "the lease did not check the sandbox it may have frozen"
    );
    // Shutdown thaws what is paused.
    pool.pause_idle(Duration::ZERO).await.unwrap();
    assert_eq!(pool.thaw_all().await, 1);
    assert_eq!(fake.containers(), vec![(pool.container_name(&a), true)]);
}
