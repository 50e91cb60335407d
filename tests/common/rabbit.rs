//! A throwaway RabbitMQ node on spare loopback ports, so that a test can stop and restart it
//! without touching the machine's shared broker.

use std::path::PathBuf;
use std::process::Command;

use super::{free_port, is_root};
use std::time::{Duration, Instant};

/// A RabbitMQ node; stopped and deleted on drop.
pub struct RabbitNode {
    pub port: u16,
    dist_port: u16,
    name: String,
    dir: PathBuf,
}

impl RabbitNode {
    /// Starts a node with no plugins and waits until it accepts AMQP connections.
    pub fn start() -> Self {
        Self::start_with(|_| (String::new(), Vec::new()))
    }

    /// Starts a node whose `rabbitmq.conf` and extra files (name, contents; written into the
    /// node's folder, readable by the broker) come from `configure`, given that folder.
    pub fn start_with(
        configure: impl FnOnce(&std::path::Path) -> (String, Vec<(String, Vec<u8>)>),
    ) -> Self {
        let port = free_port();
        let dist_port = free_port();
        let name = format!("ir{port}@localhost");
        let dir = std::env::temp_dir().join(format!("ir-rabbit-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        let (conf, files) = configure(&dir);
        if !conf.is_empty() {
            std::fs::write(dir.join("rabbitmq.conf"), conf).unwrap();
        }
        for (name, contents) in files {
            std::fs::write(dir.join(name), contents).unwrap();
        }
        if is_root() {
            Command::new("chown")
                .args(["-R", "rabbitmq:rabbitmq"])
                .arg(&dir)
                .status()
                .unwrap();
        }
        let node = Self {
            port,
            dist_port,
            name,
            dir,
        };
        node.boot();
        node
    }

    /// The AMQP URL of the node.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn boot(&self) {
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_PID_FILE", self.dir.join("pid"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq"))
            .status()
            .expect("rabbitmq-server");
        assert!(status.success(), "rabbitmq-server -detached failed");
        let deadline = Instant::now() + Duration::from_secs(90);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "RabbitMQ node {} did not start",
                self.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the node (its queues persist on disk).
    pub fn stop(&self) {
        // Bounded: rabbitmqctl can wait for a node that no longer answers.
        let _ = Command::new("timeout")
            .args(["90", "rabbitmqctl", "-n", &self.name, "stop"])
            .output();
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `rabbitmqctl` against this node (bounded) and asserts that it succeeded.
    pub fn ctl(&self, args: &[&str]) {
        let out = Command::new("timeout")
            .args(["60", "rabbitmqctl", "-n", &self.name])
            .args(args)
            .output()
            .expect("rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Imports definitions (JSON), from a copy in the node's own folder: the CLI runs as the
    /// broker's user, which may not read the test's files (and RabbitMQ 3.10 cannot read them
    /// from standard input).
    pub fn import_definitions(&self, definitions: &[u8]) {
        let path = self.dir.join("definitions.json");
        std::fs::write(&path, definitions).unwrap();
        self.ctl(&["import_definitions", path.to_str().unwrap()]);
    }

    /// The node's Erlang name (`ir<port>@localhost`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `rabbitmqctl` against this node (bounded) and returns what it printed.
    pub fn query(&self, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .args(["60", "rabbitmqctl", "-n", &self.name])
            .args(args)
            .output()
            .expect("rabbitmqctl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Kills the node's Erlang VM with SIGKILL, as a crash would, and waits until its port is
    /// closed.
    pub fn kill(&self) {
        let pid = std::fs::read_to_string(self.dir.join("pid")).expect("the node's pid file");
        let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts the node again after `stop`.
    pub fn restart(&self) {
        self.boot();
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A user on the machine's shared broker, with every permission on `/` and the password
/// `secret`, named `prefix-` and a random suffix; deleted on drop.
pub struct BrokerUser {
    pub name: String,
}

impl BrokerUser {
    pub fn create(prefix: &str) -> Self {
        let name = format!(
            "{prefix}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let ctl = |args: &[&str]| {
            let out = Command::new("timeout")
                .arg("60")
                .arg("rabbitmqctl")
                .args(args)
                .output()
                .expect("rabbitmqctl");
            assert!(
                out.status.success(),
                "rabbitmqctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ctl(&["add_user", &name, "secret"]);
        let user = Self { name };
        ctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]);
        user
    }

    /// The shared broker's URL, as this user.
    pub fn url(&self) -> String {
        super::app::amqp_url().replacen("guest:guest", &format!("{}:secret", self.name), 1)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = Command::new("timeout")
            .args(["60", "rabbitmqctl", "delete_user", &self.name])
            .output();
    }
}
