//! The Python scripts of `tests/apps/` (real clients: confluent-kafka, Qpid Proton,
//! paho-mqtt), run in the background; their JSON lines are read as they print them.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Debian's interpreter: the one python3-qpid-proton and python3-paho-mqtt are installed for.
pub const DEBIAN_PYTHON: &str = "/usr/bin/python3";
/// How long an application or device script may take for its whole part, on a loaded machine.
pub const SCRIPT_SECS: u64 = 60;
/// How long the test waits for the next line of a script (its own limit, and some room).
pub const LINE_WAIT: Duration = Duration::from_secs(SCRIPT_SECS + 15);

/// An interpreter with confluent-kafka (from PyPI): `FERRULE_TEST_PYTHON` (scripts/test sets
/// it), else the virtual environment that scripts/lib.sh makes.
pub fn kafka_python() -> String {
    let python = std::env::var("FERRULE_TEST_PYTHON")
        .unwrap_or_else(|_| format!("{}/tools/python/bin/python3", super::ferrule_home()));
    let usable = Command::new(&python)
        .args(["-c", "import confluent_kafka"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        usable,
        "no Python with confluent-kafka at {python}: scripts/test installs it (ensure_base in \
         scripts/lib.sh), or set FERRULE_TEST_PYTHON to an interpreter that has it"
    );
    python
}

pub fn script(name: &str) -> String {
    format!("{}/tests/apps/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A script running in the background whose JSON lines are read as it prints them.
pub struct Script {
    pub name: &'static str,
    pub child: Child,
    lines: Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<Value>,
    stderr: Arc<Mutex<String>>,
}

impl Script {
    pub fn spawn(name: &'static str, python: &str, args: &[&str]) -> Script {
        let mut child = Command::new(python)
            .arg(script(name))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{python} {name}: {e}"));
        let (tx, lines) = channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (mut pipe, sink) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Script {
            name,
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// The value of the next line that has `key`; panics, telling what the script said, when
    /// it reports an error, ends, or says nothing of the kind within `LINE_WAIT`.
    pub fn expect(&mut self, key: &str, why: &str) -> Value {
        let deadline = Instant::now() + LINE_WAIT;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(wait) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => self.fail(key, why, "said nothing more"),
                Err(RecvTimeoutError::Disconnected) => self.fail(key, why, "ended"),
            };
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|_| panic!("{}: not JSON: {line}", self.name));
            self.seen.push(v.clone());
            if v.get("error").is_some() {
                self.fail(key, why, "reported an error");
            }
            if let Some(found) = v.get(key) {
                return found.clone();
            }
        }
    }

    pub fn fail(&mut self, key: &str, why: &str, what: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(100));
        panic!(
            "{why}: {} {what} before a `{key}` line.\nits lines:\n{}\nits stderr:\n{}",
            self.name,
            self.said(),
            self.stderr.lock().unwrap()
        );
    }

    /// What the script printed so far, one JSON line each.
    pub fn said(&self) -> String {
        let lines: Vec<String> = self.seen.iter().map(Value::to_string).collect();
        lines.join("\n")
    }

    /// Waits for the script to exit and checks that it succeeded.
    pub fn finish(mut self) {
        let deadline = Instant::now() + LINE_WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "{} exited with {status}:\n{}\n{}",
                    self.name,
                    self.said(),
                    self.stderr.lock().unwrap()
                );
                return;
            }
            assert!(Instant::now() < deadline, "{} does not exit", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
