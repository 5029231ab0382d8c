//! The watcher of a gateway's upstreams: tells the clients when one's
//! availability changes and keeps the stack's catalog in step.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use rmcp::model::{ServerNotification, ToolListChangedNotification};
use tokio::sync::Notify;

use super::{Gateway, Member, WATCH_INTERVAL};

/// Tells the clients when an upstream's availability changes, and keeps
/// the stack's catalog in step with the upstreams' (until the gateway is
/// dropped).
pub(super) async fn watch(gateway: Weak<Gateway>, changed: Arc<Notify>) {
    let mut available: Vec<bool> = Vec::new();
    let mut versions: Vec<u64> = Vec::new();
    loop {
        {
            let Some(gateway) = gateway.upgrade() else {
                return;
            };
            let now: Vec<bool> = gateway.members.iter().map(Member::is_available).collect();
            let now_versions: Vec<u64> = gateway
                .members
                .iter()
                .map(|m| m.catalog.version())
                .collect();
            if now_versions != versions {
                gateway.sync_catalog();
                versions = now_versions;
            }
            if !available.is_empty() && now != available {
                for (member, (&was, &is)) in gateway.members.iter().zip(available.iter().zip(&now))
                {
                    if was != is {
                        tracing::info!(
                            upstream = %member.name,
                            available = is,
                            "the upstream's tools are {}",
                            if is { "available" } else { "unavailable" }
                        );
                    }
                }
                gateway
                    .downstreams
                    .broadcast(&ServerNotification::ToolListChangedNotification(
                        ToolListChangedNotification::default(),
                    ));
            }
            for (member, &is) in gateway.members.iter().zip(&now) {
                member.announced.store(is, Ordering::Relaxed);
            }
            available = now;
        }
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep(WATCH_INTERVAL) => {}
        }
    }
}
