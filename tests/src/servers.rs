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
