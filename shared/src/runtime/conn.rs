//! A connection to the fleet's Redis, one server, a Sentinel-managed master or a cluster, behind
//! one type: every command goes to the node that serves its key.
//!
//! On a Redis Cluster, redis-rs routes a command by its key and follows `MOVED`/`ASK`, but sends
//! a whole pipeline to the node of its first key and lets Redis refuse the rest (`CROSSSLOT`,
//! `MOVED`). The fleet's pipelines span streams (the acknowledgements, dead letters and
//! watermarks of a settlement; the keep-alive's claims; the projector's calls), so here a
//! pipeline over several slots is split into one pipeline per slot, sent at once (one round trip
//! per node, concurrently), and its replies put back in order. Commands without a key go with the
//! command before them (so `PUBLISH`es keep their order); a pipeline of keyless commands goes
//! whole to one master, but `SCRIPT LOAD`s, sent command by command so that redis-rs loads each
//! script on every node.

use std::collections::HashMap;

use futures_util::future::{join_all, BoxFuture, FutureExt};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use crate::runtime::sentinel::SentinelConn;

/// The fleet's Redis: one server, a master that sentinels name, or a cluster.
#[derive(Clone)]
pub enum Conn {
    /// One server (reconnects by itself).
    Server(ConnectionManager),
    /// The master of a Sentinel-managed Redis (follows failovers by itself).
    Sentinel(SentinelConn),
    /// A Redis Cluster (follows slot moves and failovers by itself).
    Cluster(ClusterConnection),
}

/// A master of a cluster and the slot ranges it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Master {
    pub host: String,
    pub port: u16,
    /// Inclusive ranges.
    pub slots: Vec<(u16, u16)>,
}

impl Master {
    /// Whether it serves `slot`.
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

impl Conn {
    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// The masters of the cluster with their slots (`CLUSTER SLOTS`); `None` on one server.
    pub async fn masters(&mut self) -> RedisResult<Option<Vec<Master>>> {
        let Conn::Cluster(conn) = self else {
            return Ok(None);
        };
        let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
        Ok(Some(parse_cluster_slots(reply)?))
    }

    /// Runs `cmd` on the node at `host:port` (a cluster's node; on one server, on it).
    pub async fn on_node<T: redis::FromRedisValue>(
        &mut self,
        host: &str,
        port: u16,
        cmd: &Cmd,
    ) -> RedisResult<T> {
        match self {
            Conn::Server(conn) => cmd.query_async(conn).await,
            Conn::Sentinel(conn) => cmd.query_async(conn).await,
            Conn::Cluster(conn) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.to_owned(),
                    port,
                });
                let value = conn.route_command(cmd.clone(), routing).await?;
                Ok(redis::from_redis_value(value)?)
            }
        }
    }
}

/// The masters in a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, ...], replicas...], ...]`.
fn parse_cluster_slots(reply: Value) -> RedisResult<Vec<Master>> {
    let bad =
        || redis::RedisError::from((redis::ErrorKind::Parse, "unexpected CLUSTER SLOTS reply"));
    let Value::Array(ranges) = reply else {
        return Err(bad());
    };
    let mut masters: Vec<Master> = Vec::new();
    for range in ranges {
        let Value::Array(items) = range else {
            return Err(bad());
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(node))) =
            (items.first(), items.get(1), items.get(2))
        else {
            return Err(bad());
        };
        let host: String = node
            .first()
            .map(|v| redis::from_redis_value(v.clone()))
            .transpose()?
            .ok_or_else(bad)?;
        let Some(Value::Int(port)) = node.get(1) else {
            return Err(bad());
        };
        let (port, range) = (*port as u16, (*start as u16, *end as u16));
        match masters
            .iter_mut()
            .find(|m| m.host == host && m.port == port)
        {
            Some(m) => m.slots.push(range),
            None => masters.push(Master {
                host,
                port,
                slots: vec![range],
            }),
        }
    }
    Ok(masters)
}

/// Whether `cmd` is a `SCRIPT` subcommand (redis-rs sends `SCRIPT LOAD` to every node).
fn is_script(cmd: &Cmd) -> bool {
    matches!(cmd.args_iter().next(), Some(redis::Arg::Simple(name)) if name.eq_ignore_ascii_case(b"SCRIPT"))
}

/// The key a command is routed by, for the commands the fleet sends; `None` for those that have
/// none (`PING`, `SCRIPT LOAD`, `PUBLISH`: a channel is not a key, and a `PUBLISH` reaches every
/// node of a cluster).
pub fn routing_key(cmd: &Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .map(|a| match a {
            redis::Arg::Simple(a) => a,
            _ => b"0".as_slice(),
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    let at = |i: usize| args.get(i).map(|a| a.to_vec());
    match name.as_slice() {
        b"PING" | b"INFO" | b"TIME" | b"SCRIPT" | b"CLIENT" | b"CONFIG" | b"CLUSTER"
        | b"PUBLISH" | b"MULTI" | b"EXEC" | b"DISCARD" | b"SCAN" | b"ACL" | b"DBSIZE"
        | b"HELLO" | b"AUTH" | b"SELECT" | b"ECHO" | b"WAIT" | b"FUNCTION" | b"FLUSHALL" => None,
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" => {
            let keys: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
            if keys > 0 {
                at(3)
            } else {
                None
            }
        }
        b"XREAD" | b"XREADGROUP" => {
            let streams = args
                .iter()
                .position(|a| a.eq_ignore_ascii_case(b"STREAMS"))?;
            at(streams + 1)
        }
        b"XINFO" | b"XGROUP" | b"OBJECT" | b"MEMORY" => at(2),
        _ => at(1),
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Server(conn) => conn.req_packed_command(cmd),
            Conn::Sentinel(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Server(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => {
                if pipeline.is_transaction() {
                    // MULTI ... EXEC: one slot by construction (Redis refuses it otherwise).
                    return conn.req_packed_commands(pipeline, offset, count);
                }
                by_slot(conn.clone(), pipeline).boxed()
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Server(conn) => conn.get_db(),
            Conn::Sentinel(conn) => conn.get_db(),
            Conn::Cluster(_) => 0,
        }
    }
}

/// A pipeline on a cluster: one pipeline per slot, sent at once, the replies in the original order.
fn by_slot(
    conn: ClusterConnection,
    pipeline: &Pipeline,
) -> BoxFuture<'static, RedisResult<Vec<Value>>> {
    let cmds: Vec<Cmd> = pipeline.cmd_iter().cloned().collect();
    // Per slot, in order of first use: its route and the indices of its commands.
    let mut groups: Vec<(Route, Vec<usize>)> = Vec::new();
    let mut slot_of: HashMap<Slot, usize> = HashMap::new();
    let mut current: Option<usize> = None;
    let mut keyless = Vec::new();
    for (i, cmd) in cmds.iter().enumerate() {
        match routing_key(cmd) {
            Some(key) => {
                let slot = Slot::for_key(&key);
                let g = *slot_of.entry(slot).or_insert_with(|| {
                    groups.push((Route::with_key(&key, SlotAddr::Master), Vec::new()));
                    groups.len() - 1
                });
                groups[g].1.push(i);
                current = Some(g);
            }
            None => match current {
                Some(g) => groups[g].1.push(i),
                None => keyless.push(i),
            },
        }
    }
    // Keyless commands before any keyed one go with the first group, if there is one.
    if let Some(first) = groups.first_mut() {
        let mut indices = std::mem::take(&mut keyless);
        indices.append(&mut first.1);
        indices.sort_unstable();
        first.1 = indices;
    }
    async move {
        let n = cmds.len();
        if groups.is_empty() {
            if cmds.iter().any(is_script) {
                // Scripts loaded: each command routed by redis-rs (to every node).
                let replies = join_all(cmds.iter().map(|cmd| {
                    let mut conn = conn.clone();
                    async move { conn.req_packed_command(cmd).await }
                }))
                .await;
                return replies.into_iter().collect();
            }
            // Keyless commands (PUBLISH): together, to one master, in order.
            let mut conn = conn.clone();
            let mut whole = redis::pipe();
            for cmd in &cmds {
                whole.add_command(cmd.clone());
            }
            return conn
                .route_pipeline(whole, 0, n, SingleNodeRoutingInfo::RandomPrimary)
                .await;
        }
        let sent = join_all(groups.iter().map(|(route, indices)| {
            let mut sub = redis::pipe();
            for &i in indices {
                sub.add_command(cmds[i].clone());
            }
            let mut conn = conn.clone();
            let (route, len) = (*route, indices.len());
            async move {
                conn.route_pipeline(sub, 0, len, SingleNodeRoutingInfo::SpecificNode(route))
                    .await
            }
        }))
        .await;
        let mut out = vec![Value::Nil; n];
        for ((_, indices), replies) in groups.iter().zip(sent) {
            for (&i, value) in indices.iter().zip(replies?) {
                out[i] = value;
            }
        }
        Ok(out)
    }
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_route_by_their_key() {
        let key = |cmd: &Cmd| routing_key(cmd).map(|k| String::from_utf8(k).unwrap());
        assert_eq!(
            key(redis::cmd("XACK").arg("{a}:s").arg("g").arg("1-0")),
            Some("{a}:s".into())
        );
        assert_eq!(
            key(redis::cmd("EVALSHA")
                .arg("abc")
                .arg(2)
                .arg("{a}:s")
                .arg("{a}:s:dlq")),
            Some("{a}:s".into())
        );
        assert_eq!(key(redis::cmd("EVALSHA").arg("abc").arg(0)), None);
        assert_eq!(
            key(redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("g")
                .arg("c")
                .arg("COUNT")
                .arg(5)
                .arg("STREAMS")
                .arg("{b}:s")
                .arg(">")),
            Some("{b}:s".into())
        );
        assert_eq!(
            key(redis::cmd("XINFO").arg("GROUPS").arg("{c}:s")),
            Some("{c}:s".into())
        );
        assert_eq!(key(redis::cmd("PUBLISH").arg("fleet:x").arg("{}")), None);
        assert_eq!(key(redis::cmd("SCRIPT").arg("LOAD").arg("return 1")), None);
    }

    #[test]
    fn cluster_slots_replies_give_each_master_its_ranges() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |a: i64, b: i64, host: &str, port: i64| {
            Value::Array(vec![
                Value::Int(a),
                Value::Int(b),
                node(host, port),
                node("r", 1),
            ])
        };
        let masters = parse_cluster_slots(Value::Array(vec![
            range(0, 5460, "h", 1),
            range(5461, 10922, "h", 2),
            range(10923, 16383, "h", 3),
            range(16000, 16001, "h", 1),
        ]))
        .unwrap();
        assert_eq!(masters.len(), 3);
        assert_eq!(masters[0].slots, vec![(0, 5460), (16000, 16001)]);
        assert!(masters[1].serves(5461) && !masters[1].serves(5460));
    }
}
