//! Private redis-server and PostgreSQL instances for fault tests that stop, kill or restart a
//! server: the shared ones keep serving the tests that run meanwhile.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "{what} did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A folder the `postgres` user can use when we are root (a checkout may sit under a root-only home).
fn scratch(prefix: &str) -> PathBuf {
    let dir = Path::new("/var/tmp").join(crate::unique(prefix));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A throwaway CA and a server certificate for `localhost` / 127.0.0.1 (EC P-256), made with openssl.
pub struct Certs {
    dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Certs {
    /// Makes them in a fresh folder.
    pub fn make() -> Self {
        let dir = scratch("certs-");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"],
            &ec[..],
            &[
                "-days",
                "2",
                "-subj",
                "/CN=streamfleet test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
            ],
        ]
        .concat());
        run(&[
            &["req"],
            &ec[..],
            &[
                "-subj",
                "/CN=localhost",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
            ],
        ]
        .concat());
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ]);
        Certs {
            ca: dir.join("ca.crt"),
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            dir,
        }
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server of one test's own, with AOF on and fsync at every write.
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Extra server arguments (TLS, ACL users).
    server_args: Vec<String>,
    /// redis-cli arguments to reach it (TLS, credentials).
    cli_args: Vec<String>,
}

impl PrivateRedis {
    /// Starts it on a free port.
    pub fn start() -> Self {
        let port = free_port();
        Self::launch(port, vec!["--port".into(), port.to_string()], Vec::new())
    }

    /// Starts it on a free port with extra server arguments (e.g. `--aclfile`).
    pub fn start_with(args: &[String]) -> Self {
        let port = free_port();
        let mut server = vec!["--port".into(), port.to_string()];
        server.extend(args.iter().cloned());
        Self::launch(port, server, Vec::new())
    }

    /// Starts a TLS-only server whose only user is `user` / `password` (the default user is off).
    pub fn start_tls(certs: &Certs, user: &str, password: &str) -> Self {
        let port = free_port();
        let path = |p: &Path| p.display().to_string();
        let server = vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            path(&certs.cert),
            "--tls-key-file".into(),
            path(&certs.key),
            "--tls-ca-cert-file".into(),
            path(&certs.ca),
            "--tls-auth-clients".into(),
            "no".into(),
            "--user".into(),
            "default".into(),
            "off".into(),
            "--user".into(),
            user.into(),
            "on".into(),
            format!(">{password}"),
            "~*".into(),
            "&*".into(),
            "+@all".into(),
        ];
        let cli = vec![
            "--tls".into(),
            "--cacert".into(),
            path(&certs.ca),
            "--user".into(),
            user.into(),
            "--pass".into(),
            password.into(),
            "--no-auth-warning".into(),
        ];
        Self::launch(port, server, cli)
    }

    fn launch(port: u16, server_args: Vec<String>, cli_args: Vec<String>) -> Self {
        let mut r = PrivateRedis {
            port,
            dir: scratch("redis-"),
            child: None,
            server_args,
            cli_args,
        };
        r.spawn();
        r
    }

    fn cli(&self) -> Command {
        let mut c = Command::new("redis-cli");
        c.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.cli_args);
        c
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1"])
            .args(&self.server_args)
            .arg("--dir")
            .arg(&self.dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        wait_for("redis-server", || {
            self.cli()
                .arg("ping")
                .output()
                .is_ok_and(|o| o.stdout.starts_with(b"PONG"))
        });
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A clean restart: SHUTDOWN (the AOF is complete), then start again on the same data.
    pub fn restart(&mut self) {
        let _ = self.cli().arg("shutdown").output();
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        self.spawn();
    }

    /// SIGKILL, and no restart.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A crash: SIGKILL, then start again on the same data. With `appendfsync always` every
    /// reply was preceded by its write to the AOF; a transaction cut short at its end is dropped
    /// when the AOF loads.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Sentinel-managed Redis of one test's own: a master, one replica (`--replicaof`) and three
/// sentinels (quorum 2, a master down after 1 s), all on free loopback ports. `start` returns once
/// the replica is in sync and every sentinel knows the replica and the two other sentinels, so
/// that a failover can happen.
pub struct PrivateSentinels {
    /// The master's name the sentinels monitor.
    pub name: String,
    pub master: PrivateRedis,
    pub replica: PrivateRedis,
    sentinels: Vec<(u16, Child)>,
    dir: PathBuf,
}

impl PrivateSentinels {
    pub fn start() -> Self {
        let master = PrivateRedis::start();
        let replica = PrivateRedis::start_with(&[
            "--replicaof".into(),
            "127.0.0.1".into(),
            master.port.to_string(),
        ]);
        wait_for("the replica's link to its master", || {
            info_field(replica.cli(), "replication", "master_link_status").as_deref() == Some("up")
        });
        let name = "fleet".to_owned();
        let dir = scratch("sentinels-");
        let sentinels = (0..3)
            .map(|i| {
                let port = free_port();
                let conf = dir.join(format!("sentinel-{i}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}
bind 127.0.0.1
dir {}
sentinel resolve-hostnames no
                         sentinel monitor {name} 127.0.0.1 {} 2
                         sentinel down-after-milliseconds {name} 1000
                         sentinel failover-timeout {name} 5000
",
                        dir.display(),
                        master.port
                    ),
                )
                .unwrap();
                let child = Command::new("redis-server")
                    .arg(&conf)
                    .arg("--sentinel")
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("redis-server --sentinel");
                (port, child)
            })
            .collect();
        let s = PrivateSentinels {
            name,
            master,
            replica,
            sentinels,
            dir,
        };
        for (port, _) in &s.sentinels {
            wait_for(
                &format!("the sentinel on {port} knowing the others"),
                || {
                    let fields = s.sentinel_master(*port);
                    let count = |k: &str| {
                        fields
                            .get(k)
                            .and_then(|v| v.parse::<u32>().ok())
                            .unwrap_or(0)
                    };
                    count("num-other-sentinels") == 2 && count("num-slaves") == 1
                },
            );
        }
        s
    }

    /// `redis+sentinel://` with every sentinel and the master's name.
    pub fn url(&self) -> String {
        let sentinels: Vec<String> = self
            .sentinels
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect();
        format!("redis+sentinel://{}/{}", sentinels.join(","), self.name)
    }

    /// What the sentinel on `port` says of the master (`SENTINEL MASTER`).
    fn sentinel_master(&self, port: u16) -> std::collections::HashMap<String, String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["sentinel", "master", &self.name])
            .output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines
            .chunks(2)
            .filter_map(|kv| Some((kv.first()?.to_string(), kv.get(1)?.to_string())))
            .collect()
    }

    /// Kills the master (SIGKILL): the sentinels see it down after a second and promote the
    /// replica.
    pub fn kill_master(&mut self) {
        self.master.kill();
    }

    /// A failover on demand (`SENTINEL FAILOVER`): the replica is promoted and the master, alive,
    /// is demoted to its replica.
    pub fn failover(&self) {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.sentinels[0].0.to_string()])
            .args(["sentinel", "failover", &self.name])
            .output()
            .unwrap();
        assert!(
            out.stdout.starts_with(b"OK"),
            "SENTINEL FAILOVER: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// Waits (at most 60 s) until a majority of the sentinels name the replica as the master and
    /// it says it is one.
    pub fn wait_failover(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let naming = self
                .sentinels
                .iter()
                .filter(|(port, _)| {
                    self.sentinel_master(*port).get("port").map(String::as_str)
                        == Some(&self.replica.port.to_string())
                })
                .count();
            let role = info_field(self.replica.cli(), "replication", "role");
            if naming >= 2 && role.as_deref() == Some("master") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no failover within 60 s: {naming} sentinels name the replica, it says {role:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for PrivateSentinels {
    fn drop(&mut self) {
        for (_, child) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A field of `INFO <section>`, through `cli` (a redis-cli reaching the server).
fn info_field(mut cli: Command, section: &str, field: &str) -> Option<String> {
    let out = cli.args(["info", section]).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix(field)?
                .strip_prefix(':')
                .map(str::to_owned)
        })
}

/// A PostgreSQL cluster of one test's own (fsync and synchronous_commit on, the defaults).
pub struct PrivatePostgres {
    pub port: u16,
    data: PathBuf,
    bin: PathBuf,
}

impl PrivatePostgres {
    /// initdb and start on a free port, with a database `fleet`.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Like [`PrivatePostgres::start`], but accepting only TLS connections, with `certs`.
    pub fn start_tls(certs: &Certs) -> Self {
        Self::start_with(Some(certs))
    }

    fn start_with(tls: Option<&Certs>) -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (scripts/services)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("pg_ctl").exists())
            .max()
            .expect("pg_ctl");
        let data = scratch("pg-");
        if is_root() {
            let ok = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&data)
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let pg = PrivatePostgres {
            port: free_port(),
            data,
            bin,
        };
        let ok = pg
            .as_pg(pg.bin.join("initdb"))
            .arg("-D")
            .arg(&pg.data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "initdb");
        if let Some(certs) = tls {
            std::fs::copy(&certs.cert, pg.data.join("server.crt")).unwrap();
            std::fs::copy(&certs.key, pg.data.join("server.key")).unwrap();
            let mut conf = std::fs::read_to_string(pg.data.join("postgresql.conf")).unwrap();
            conf.push_str(
                "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            );
            std::fs::write(pg.data.join("postgresql.conf"), conf).unwrap();
            std::fs::write(
                pg.data.join("pg_hba.conf"),
                "hostssl all all 127.0.0.1/32 trust\n",
            )
            .unwrap();
            if is_root() {
                for f in ["server.crt", "server.key", "postgresql.conf", "pg_hba.conf"] {
                    Command::new("chown")
                        .arg("postgres:postgres")
                        .arg(pg.data.join(f))
                        .status()
                        .unwrap();
                }
            }
            Command::new("chmod")
                .arg("600")
                .arg(pg.data.join("server.key"))
                .status()
                .unwrap();
        }
        pg.start_again();
        let ok = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "postgres",
                "-qc",
                "create database fleet",
            ])
            .status()
            .unwrap();
        assert!(ok.success());
        pg
    }

    fn as_pg(&self, program: PathBuf) -> Command {
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(program)
                .current_dir("/");
            c
        } else {
            Command::new(program)
        }
    }

    /// `pg_ctl -D <data>`, run as the postgres user.
    fn pg_ctl(&self) -> Command {
        let mut c = self.as_pg(self.bin.join("pg_ctl"));
        c.arg("-D").arg(&self.data).stdout(Stdio::null());
        c
    }

    /// The URL of its `fleet` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/fleet", self.port)
    }

    /// Stops it (fast shutdown: clients are disconnected).
    pub fn stop(&self) {
        let ok = self
            .pg_ctl()
            .args(["-m", "fast", "-w", "stop"])
            .status()
            .unwrap();
        assert!(ok.success(), "pg_ctl stop");
    }

    /// Starts it again on the same data.
    pub fn start_again(&self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories=''",
            self.port
        );
        let ok = self
            .pg_ctl()
            .arg("-l")
            .arg(self.data.join("server.log"))
            .args(["-w", "-t", "60", "-o", &opts, "start"])
            .status()
            .unwrap();
        assert!(ok.success(), "pg_ctl start");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .pg_ctl()
            .args(["-m", "immediate", "-w", "stop"])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// A Redis Cluster of one test's own: masters with one replica each, on free loopback ports, AOF
/// on (fsync every second, as deployed) and `cluster-node-timeout` 2000 ms, so that a master's
/// failover takes seconds. Every call waits for what it did to settle: a test never meets a
/// replica still syncing (it refuses to take over) or a node with a stale slot map. Blocking
/// calls, like the rest of this file. Killed, and its folder removed, on drop.
pub struct PrivateCluster {
    dir: PathBuf,
    nodes: Vec<ClusterNode>,
    /// How the nodes are reached (TLS, the admin user) by this harness and redis-cli.
    access: NodeAccess,
    /// Extra server arguments of every node (TLS files, the ACL file, replication's user).
    server_args: Vec<String>,
}

/// The ACL user a TLS [`PrivateCluster`] has for the harness itself (`~* &* +@all`): its checks,
/// `redis-cli --cluster create`, the replicas' sync with their masters (`masteruser`), and the
/// tests' own reads. The default user is off.
pub const CLUSTER_ADMIN: &str = "admin";
/// [`CLUSTER_ADMIN`]'s password.
pub const CLUSTER_ADMIN_PASSWORD: &str = "pw-admin-3c7e";

/// How to reach a node: plain TCP with the default user, or TLS verified against a CA file and
/// an ACL user.
#[derive(Clone, Debug, Default)]
struct NodeAccess {
    /// The CA file that signed the nodes' certificate: TLS when set.
    ca: Option<PathBuf>,
    /// The certificate and key presented to a node that asks for one (`tls-auth-clients yes`).
    client: Option<(PathBuf, PathBuf)>,
    /// User and password, when the default user is off.
    user: Option<(String, String)>,
}

impl NodeAccess {
    /// The URL of the node at `addr` (`127.0.0.1:<port>`), credentials included.
    fn url(&self, addr: &str) -> String {
        let scheme = if self.ca.is_some() { "rediss" } else { "redis" };
        match &self.user {
            Some((user, password)) => format!("{scheme}://{user}:{password}@{addr}"),
            None => format!("{scheme}://{addr}"),
        }
    }

    fn client(&self, addr: &str) -> Option<redis::Client> {
        match &self.ca {
            None => redis::Client::open(self.url(addr)).ok(),
            Some(ca) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let client_tls = match &self.client {
                    Some((cert, key)) => Some(redis::ClientTlsConfig {
                        client_cert: std::fs::read(cert).ok()?,
                        client_key: std::fs::read(key).ok()?,
                    }),
                    None => None,
                };
                redis::Client::build_with_tls(
                    self.url(addr),
                    redis::TlsCertificates {
                        client_tls,
                        root_cert: Some(std::fs::read(ca).ok()?),
                    },
                )
                .ok()
            }
        }
    }

    /// redis-cli's arguments to reach a node this way.
    fn cli_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(ca) = &self.ca {
            args.extend(["--tls".into(), "--cacert".into(), ca.display().to_string()]);
        }
        if let Some((cert, key)) = &self.client {
            args.extend([
                "--cert".into(),
                cert.display().to_string(),
                "--key".into(),
                key.display().to_string(),
            ]);
        }
        if let Some((user, password)) = &self.user {
            args.extend([
                "--user".into(),
                user.clone(),
                "--pass".into(),
                password.clone(),
                "--no-auth-warning".into(),
            ]);
        }
        args
    }
}

/// One redis-server of a [`PrivateCluster`].
struct ClusterNode {
    port: u16,
    /// Its cluster bus port, a free one too: the default, port + 10000, may be past 65535.
    bus_port: u16,
    child: Option<Child>,
    /// The slots it served when [`PrivateCluster::kill_master`] killed it: whoever serves them
    /// after the failover is its successor.
    served: Vec<(u16, u16)>,
}

impl ClusterNode {
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// A node as a line of CLUSTER NODES shows it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClusterMember {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    pub id: String,
    /// A replica's master (its node id); None for a master.
    pub master: Option<String>,
    /// A master's slot ranges, inclusive.
    pub slots: Vec<(u16, u16)>,
    /// Flagged `fail` or `fail?` by the node asked.
    pub failed: bool,
}

/// One command to the node at `addr`, reached as `access` says (TLS, an ACL user); None when it
/// does not answer as asked (killed, loading).
fn ask_as<T: redis::FromRedisValue>(access: &NodeAccess, addr: &str, args: &[&str]) -> Option<T> {
    let client = access.client(addr)?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    redis::cmd(args[0]).arg(&args[1..]).query(&mut conn).ok()
}

/// CLUSTER NODES: `<id> <ip:port@bus[,hostname]> <flags> <master> <ping> <pong> <epoch> <link>
/// <slot>...`, a slot being `n`, `a-b`, or `[n->-id]` / `[n-<-id]` while it migrates.
fn parse_cluster_nodes(text: &str) -> Vec<ClusterMember> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let flags: Vec<&str> = f.get(2)?.split(',').collect();
            let slots = f
                .iter()
                .skip(8)
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| {
                    let (a, b) = s.split_once('-').unwrap_or((s, s));
                    Some((a.parse().ok()?, b.parse().ok()?))
                })
                .collect();
            Some(ClusterMember {
                addr: f[1].split(['@', ',']).next()?.to_string(),
                id: f[0].to_string(),
                master: flags.contains(&"slave").then(|| f[3].to_string()),
                slots,
                failed: flags.iter().any(|f| f.starts_with("fail")),
            })
        })
        .collect()
}

impl PrivateCluster {
    /// Starts `masters` masters and as many replicas, joined by `redis-cli --cluster create`, and
    /// waits until every node says `cluster_state:ok`, all agree on roles and slots, and every
    /// replica's link is up. The first node is the first master.
    pub fn start(masters: usize) -> Self {
        Self::create(
            scratch("cluster-"),
            masters,
            NodeAccess::default(),
            Vec::new(),
        )
    }

    /// Like [`PrivateCluster::start`], but TLS only and with ACL users, as a production cluster
    /// runs: every node listens on a TLS port alone (`--port 0`), its cluster bus and its
    /// replication over TLS too (`tls-cluster`, `tls-replication`), with `certs`' server
    /// certificate (for `localhost` / 127.0.0.1, the address the nodes announce) and no client
    /// certificate asked. Each node loads one ACL file: the default user off, [`CLUSTER_ADMIN`]
    /// for the harness (and the replicas' sync: `masteruser`), and `users` (ACL file lines, e.g.
    /// deploy's users with their key patterns renamed). The certificate files are copied into the
    /// cluster's folder, so a node restarts on them whatever became of `certs`.
    pub fn start_tls(masters: usize, certs: &Certs, users: &str) -> Self {
        Self::start_secure(masters, certs, users, false)
    }

    /// Like [`PrivateCluster::start_tls`], but every node asks each client for a certificate
    /// signed by the CA (`tls-auth-clients yes`) and refuses a connection without one. `certs`'
    /// server certificate serves as the client certificate too (it has no extended key usage
    /// that would restrict it to servers): the harness presents it, the nodes to each other, and
    /// the workers are given it (`FLEET_REDIS_CLIENT_CERT` / `FLEET_REDIS_CLIENT_KEY`).
    pub fn start_mtls(masters: usize, certs: &Certs, users: &str) -> Self {
        Self::start_secure(masters, certs, users, true)
    }

    fn start_secure(masters: usize, certs: &Certs, users: &str, client_auth: bool) -> Self {
        let dir = scratch("cluster-tls-");
        let copy = |from: &Path, name: &str| {
            let to = dir.join(name);
            std::fs::copy(from, &to).expect("copy a certificate file");
            to.display().to_string()
        };
        let (ca, cert, key) = (
            copy(&certs.ca, "ca.crt"),
            copy(&certs.cert, "server.crt"),
            copy(&certs.key, "server.key"),
        );
        let acl = dir.join("users.acl");
        std::fs::write(
            &acl,
            format!(
                "user default off\n\
                 user {CLUSTER_ADMIN} on >{CLUSTER_ADMIN_PASSWORD} ~* &* +@all\n{users}\n"
            ),
        )
        .expect("the ACL file");
        let server_args = [
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-cluster",
            "yes",
            "--tls-replication",
            "yes",
            "--tls-auth-clients",
            if client_auth { "yes" } else { "no" },
            "--aclfile",
            &acl.display().to_string(),
            "--masteruser",
            CLUSTER_ADMIN,
            "--masterauth",
            CLUSTER_ADMIN_PASSWORD,
        ]
        .map(String::from)
        .to_vec();
        let access = NodeAccess {
            ca: Some(PathBuf::from(ca)),
            client: client_auth.then(|| (PathBuf::from(cert), PathBuf::from(key))),
            user: Some((CLUSTER_ADMIN.into(), CLUSTER_ADMIN_PASSWORD.into())),
        };
        Self::create(dir, masters, access, server_args)
    }

    /// Starts the nodes in `dir`, reached as `access` says, and joins them into a cluster.
    fn create(dir: PathBuf, masters: usize, access: NodeAccess, server_args: Vec<String>) -> Self {
        assert!(
            masters >= 3,
            "a Redis Cluster needs 3 masters: redis-cli creates no fewer, and electing a replica \
             takes the votes of a majority of the masters"
        );
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < masters * 4 {
            let port = free_port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let mut cluster = PrivateCluster {
            dir,
            access,
            server_args,
            nodes: ports
                .chunks(2)
                .map(|p| ClusterNode {
                    port: p[0],
                    bus_port: p[1],
                    child: None,
                    served: Vec::new(),
                })
                .collect(),
        };
        for i in 0..cluster.nodes.len() {
            cluster.spawn_new(i);
        }
        let out = Command::new("redis-cli")
            .args(cluster.access.cli_args())
            .args(["--cluster", "create"])
            .args(cluster.nodes.iter().map(ClusterNode::addr))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.settle("the new cluster", || Ok(()));
        cluster
    }

    /// Starts node `i` on its folder: a fresh one, or the nodes.conf and AOF it left when killed.
    fn spawn(&mut self, i: usize) {
        if let Err(why) = self.try_spawn(i) {
            panic!("{why}");
        }
    }

    /// Starts node `i` of a cluster being created. A port picked free may be taken before the
    /// node binds it (an outgoing connection's ephemeral port, another test's server: they come
    /// from the same range), more often as a test's nodes start one after the other over seconds:
    /// then the node gets two other free ports and starts again.
    fn spawn_new(&mut self, i: usize) {
        for _ in 0..5 {
            match self.try_spawn(i) {
                Ok(()) => return,
                Err(why) if why.contains("Address already in use") => {
                    let node = &self.nodes[i];
                    let _ = std::fs::remove_dir_all(self.dir.join(node.port.to_string()));
                    let taken: Vec<u16> = self
                        .nodes
                        .iter()
                        .flat_map(|n| [n.port, n.bus_port])
                        .collect();
                    let mut fresh =
                        std::iter::repeat_with(free_port).filter(|p| !taken.contains(p));
                    let (port, bus_port) = (fresh.next().unwrap(), fresh.next().unwrap());
                    let node = &mut self.nodes[i];
                    (node.port, node.bus_port) = (port, bus_port);
                }
                Err(why) => panic!("{why}"),
            }
        }
        panic!("no free ports for a node after 5 tries");
    }

    /// Starts node `i` and waits until it answers; if it exits first, why (its log's end).
    fn try_spawn(&mut self, i: usize) -> Result<(), String> {
        let access = self.access.clone();
        let node = &mut self.nodes[i];
        let (addr, dir) = (node.addr(), self.dir.join(node.port.to_string()));
        std::fs::create_dir_all(&dir).expect("the node's folder");
        // Its log, for why it exited if it does (appended to: a restart keeps the earlier runs').
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("redis.log"))
            .expect("the node's log");
        let port = node.port.to_string();
        // Over TLS, the TLS port alone: the node announces it to the cluster and its clients.
        let listen = match access.ca {
            None => vec!["--port", &port],
            Some(_) => vec!["--port", "0", "--tls-port", &port],
        };
        let mut child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1"])
            .args(listen)
            .args(&self.server_args)
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-port", &node.bus_port.to_string()])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", "2000"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
            ])
            // A replica's sync starts at once, not 5 s later in case other replicas come.
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(&dir)
            .stdout(log)
            .spawn()
            .expect("redis-server");
        let mut exited = None;
        wait_for(&format!("redis-server on {addr}"), || {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                return true;
            }
            ask_as::<String>(&access, &addr, &["PING"]).as_deref() == Some("PONG")
        });
        if let Some(status) = exited {
            let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            return Err(format!(
                "redis-server on {addr} exited with {status}: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        node.child = Some(child);
        Ok(())
    }

    /// The addresses of the nodes that run (not killed).
    fn live(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(ClusterNode::addr)
            .collect()
    }

    /// CLUSTER NODES as the node at `addr` sees the cluster, sorted by address.
    fn view(&self, addr: &str) -> Result<Vec<ClusterMember>, String> {
        let text: String = self
            .ask(addr, &["CLUSTER", "NODES"])
            .ok_or(format!("{addr} does not answer"))?;
        let mut view = parse_cluster_nodes(&text);
        view.sort();
        Ok(view)
    }

    /// Ok once every running node says `cluster_state:ok`, sees the same running nodes in the
    /// same roles with the same slots (none of them failed), sees no killed node serving a slot,
    /// and, if a replica, has its link to its master up. Else why not.
    fn settled(&self) -> Result<(), String> {
        let live = self.live();
        let mut agreed: Option<(String, Vec<ClusterMember>)> = None;
        for addr in &live {
            let info: String = self.ask(addr, &["CLUSTER", "INFO"]).unwrap_or_default();
            if !info.contains("cluster_state:ok") {
                return Err(format!("{addr}: cluster_state is not ok"));
            }
            let view = self.view(addr)?;
            if view
                .iter()
                .any(|m| !live.contains(&m.addr) && !m.slots.is_empty())
            {
                return Err(format!("{addr} sees a killed node serving slots"));
            }
            let running: Vec<ClusterMember> = view
                .into_iter()
                .filter(|m| live.contains(&m.addr))
                .collect();
            if running.len() != live.len() || running.iter().any(|m| m.failed) {
                return Err(format!("{addr} does not see every running node up"));
            }
            match &agreed {
                Some((first, theirs)) if *theirs != running => {
                    return Err(format!("{addr} and {first} see different clusters"))
                }
                Some(_) => {}
                None => agreed = Some((addr.clone(), running)),
            }
            let replication: String = self.ask(addr, &["INFO", "replication"]).unwrap_or_default();
            if !replication.contains("role:master")
                && !replication.contains("master_link_status:up")
            {
                return Err(format!(
                    "{addr}: a replica whose link to its master is down"
                ));
            }
        }
        Ok(())
    }

    /// Waits (30 s at most) until the cluster is settled and `also` holds; panics saying why not.
    fn settle(&self, what: &str, also: impl Fn() -> Result<(), String>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let why = match self.settled().and_then(|()| also()) {
                Ok(()) => return,
                Err(why) => why,
            };
            assert!(Instant::now() < deadline, "{what} did not settle: {why}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One command to the node at `addr`, as [`ask_as`] with this cluster's access.
    fn ask<T: redis::FromRedisValue>(&self, addr: &str, args: &[&str]) -> Option<T> {
        ask_as(&self.access, addr, args)
    }

    fn index(&self, addr: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.addr() == addr)
            .unwrap_or_else(|| panic!("{addr} is no node of this cluster"))
    }

    /// `rediss` for a TLS cluster, else `redis`.
    fn scheme(&self) -> &'static str {
        if self.access.ca.is_some() {
            "rediss"
        } else {
            "redis"
        }
    }

    /// The URL of the first running node: the first master, until it is killed. No credentials
    /// (see [`PrivateCluster::url_as`]).
    pub fn url(&self) -> String {
        let addr = self.live().into_iter().next().expect("a running node");
        format!("{}://{addr}", self.scheme())
    }

    /// [`PrivateCluster::url`] with an ACL user's credentials.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        let addr = self.live().into_iter().next().expect("a running node");
        format!("{}://{user}:{password}@{addr}", self.scheme())
    }

    /// The URLs of all the nodes, killed ones included (seeds for a cluster client).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("{}://{}", self.scheme(), n.addr()))
            .collect()
    }

    /// The masters not failed, as the first running node sees them, in the order of the nodes.
    pub fn masters(&self) -> Vec<ClusterMember> {
        let members = self
            .members()
            .unwrap_or_else(|e| panic!("CLUSTER NODES: {e}"));
        members.into_iter().filter(|m| m.master.is_none()).collect()
    }

    /// The replicas not failed, as the first running node sees them, in the order of the nodes.
    pub fn replicas(&self) -> Vec<ClusterMember> {
        let members = self
            .members()
            .unwrap_or_else(|e| panic!("CLUSTER NODES: {e}"));
        members.into_iter().filter(|m| m.master.is_some()).collect()
    }

    /// The nodes not failed, as the first running node sees them, in the order of the nodes.
    fn members(&self) -> Result<Vec<ClusterMember>, String> {
        let addr = self.live().into_iter().next().ok_or("no node runs")?;
        let mut members: Vec<ClusterMember> = self
            .view(&addr)?
            .into_iter()
            .filter(|m| !m.failed)
            .collect();
        members.sort_by_key(|m| self.nodes.iter().position(|n| n.addr() == m.addr));
        Ok(members)
    }

    /// The address of the master serving `key`'s slot.
    pub fn master_of(&self, key: &str) -> String {
        let addr = self.live().into_iter().next().expect("a running node");
        let slot: u16 = self
            .ask(&addr, &["CLUSTER", "KEYSLOT", key])
            .unwrap_or_else(|| panic!("CLUSTER KEYSLOT {key} on {addr}"));
        self.master_of_slot(slot)
            .unwrap_or_else(|e| panic!("the master of {key}: {e}"))
    }

    fn master_of_slot(&self, slot: u16) -> Result<String, String> {
        self.members()?
            .into_iter()
            .find(|m| m.master.is_none() && m.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .map(|m| m.addr)
            .ok_or(format!("no master serves slot {slot}"))
    }

    /// SIGKILL of the master at `addr`: a crash, its last writes perhaps not yet on its replica.
    pub fn kill_master(&mut self, addr: &str) {
        let member = self
            .masters()
            .into_iter()
            .find(|m| m.addr == addr)
            .unwrap_or_else(|| panic!("{addr} is not a master of this cluster"));
        let i = self.index(addr);
        let node = &mut self.nodes[i];
        node.served = member.slots;
        let mut child = node.child.take().expect("the master runs");
        child.kill().expect("SIGKILL");
        let _ = child.wait();
    }

    /// Waits until a replica of the master killed at `old_master` has taken over: it reports
    /// `role:master`, every running node agrees that it serves the old master's slots, and the
    /// cluster is settled. Returns the new master's address.
    pub fn wait_failover(&self, old_master: &str) -> String {
        let slot = self.nodes[self.index(old_master)]
            .served
            .first()
            .unwrap_or_else(|| panic!("{old_master} was not killed by kill_master"))
            .0;
        let successor = || {
            let new = self.master_of_slot(slot)?;
            if new == old_master {
                return Err(format!("{old_master} still serves slot {slot}"));
            }
            let info: String = self.ask(&new, &["INFO", "replication"]).unwrap_or_default();
            if info.contains("role:master") {
                Ok(new)
            } else {
                Err(format!("{new} does not report role:master yet"))
            }
        };
        let what = format!("the failover of {old_master}");
        self.settle(&what, || successor().map(|_| ()));
        successor().unwrap_or_else(|e| panic!("{what}, settled: {e}"))
    }

    /// Starts the killed node at `addr` again on its nodes.conf and AOF, and waits until it has
    /// rejoined as a replica (of its successor, if it was a master) with its link up.
    pub fn restart(&mut self, addr: &str) {
        let i = self.index(addr);
        assert!(self.nodes[i].child.is_none(), "{addr} is running");
        self.spawn(i);
        self.nodes[i].served.clear();
        self.settle(&format!("{addr} rejoining"), || {
            let members = self.members()?;
            if members.iter().any(|m| m.addr == addr && m.master.is_some()) {
                Ok(())
            } else {
                Err(format!("{addr} is no replica yet"))
            }
        });
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut c) = node.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
