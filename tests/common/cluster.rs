//! A throwaway PostgreSQL cluster on a spare loopback port, so that a test can configure (TLS),
//! stop and restart it without touching the machine's shared server.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::is_root;

/// A running cluster; stopped and deleted on drop.
pub struct PgCluster {
    pub port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
}

fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries in /usr/lib/postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an initdb")
}

/// Runs a server binary as the postgres user when we are root (initdb refuses root).
fn as_owner(bin: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.args(args).output().expect("run a PostgreSQL binary")
}

impl PgCluster {
    /// Initialises a cluster whose superuser is `root` (trust authentication on loopback) and
    /// applies `extra_conf` and, if given, `hba` (the whole pg_hba.conf).
    pub fn init(extra_conf: &str, hba: Option<&str>) -> Self {
        let bin = pg_bin();
        let (port, dir) = fresh_dir();
        let data = dir.join("data");
        let out = as_owner(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "root",
                "-A",
                "trust",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\n{extra_conf}\n",
            dir.display()
        );
        append(&data.join("postgresql.conf"), &conf);
        if let Some(hba) = hba {
            std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        }
        Self { port, dir, bin }
    }

    /// Copies a file into the data directory, readable only by the server.
    pub fn install_file(&self, name: &str, contents: &[u8]) {
        let path = self.dir.join("data").join(name);
        std::fs::write(&path, contents).unwrap();
        if is_root() {
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&path)
                .status()
                .unwrap();
        }
        Command::new("chmod")
            .args(["600"])
            .arg(&path)
            .status()
            .unwrap();
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) {
        let data = self.dir.join("data");
        let log = self.dir.join("log");
        let out = as_owner(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops the server immediately (as a crash would).
    pub fn stop(&self) {
        let data = self.dir.join("data");
        let _ = as_owner(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    /// A streaming standby of this (running) cluster on a port and folder of its own, started;
    /// `pg_basebackup -R` makes it follow this one.
    pub fn standby(&self) -> Self {
        let (port, dir) = fresh_dir();
        let data = dir.join("data");
        let out = as_owner(
            &self.bin.join("pg_basebackup"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "root",
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "pg_basebackup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The copied configuration names the primary's port and socket folder; later lines win.
        let conf = format!(
            "\nport = {port}\nunix_socket_directories = '{}'\n",
            dir.display()
        );
        append(&data.join("postgresql.conf"), &conf);
        let standby = Self {
            port,
            dir,
            bin: self.bin.clone(),
        };
        standby.start();
        standby
    }

    /// Promotes a standby to primary and waits until it accepts writes.
    pub fn promote(&self) {
        let data = self.dir.join("data");
        let out = as_owner(
            &self.bin.join("pg_ctl"),
            &["-D", data.to_str().unwrap(), "-w", "-t", "60", "promote"],
        );
        assert!(
            out.status.success(),
            "pg_ctl promote: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A URL for database `db` as root, with extra query parameters.
    pub fn url(&self, db: &str, params: &str) -> String {
        format!("postgres://root@127.0.0.1:{}/{db}{params}", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

/// A spare loopback port and an empty folder named after it, owned by the server's user.
fn fresh_dir() -> (u16, PathBuf) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("ir-pg-{port}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if is_root() {
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
    }
    (port, dir)
}
