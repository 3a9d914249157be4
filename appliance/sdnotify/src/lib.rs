//! Readiness and watchdog notifications for systemd (`Type=notify`, `WatchdogSec=`).
//!
//! The appliance's units start Ferry's roles as `Type=notify`: systemd treats a role as started
//! only when it says `READY=1` (after its listeners are bound), and restarts it when it stops
//! saying `WATCHDOG=1` within `WatchdogSec=`. The protocol is one datagram per message on the
//! unix socket named by `$NOTIFY_SOCKET` (a path, or an abstract name when it starts with `@`),
//! so this crate is a few lines of std instead of a binding to libsystemd.
//!
//! Outside systemd (tests, the demo, a developer's shell) `$NOTIFY_SOCKET` is unset and every
//! call is a no-op that returns `Ok(false)`.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Send one notification (`KEY=VALUE` lines) to the service manager.
///
/// Returns `Ok(false)` when not started by systemd (no `$NOTIFY_SOCKET`).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let path = path.to_string_lossy().into_owned();
    let addr = socket_addr(&path)?;
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

fn socket_addr(path: &str) -> io::Result<SocketAddr> {
    if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else if path.starts_with('/') {
        SocketAddr::from_pathname(path)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET={path:?} is neither a path nor an abstract name"),
        ))
    }
}

/// Tell systemd the service is ready (its listeners are bound and it accepts work).
pub fn ready() -> io::Result<bool> {
    notify("READY=1")
}

/// Tell systemd the service is stopping (so a slow shutdown is not mistaken for a hang).
pub fn stopping() -> io::Result<bool> {
    notify("STOPPING=1")
}

/// Tell systemd the service is still alive.
pub fn watchdog() -> io::Result<bool> {
    notify("WATCHDOG=1")
}

/// How often to send `WATCHDOG=1`: half of `WatchdogSec=`, or `None` when no watchdog is set
/// for this process (`$WATCHDOG_USEC` unset, or `$WATCHDOG_PID` names another process).
pub fn watchdog_interval() -> Option<Duration> {
    interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.parse::<u32>().ok()? != me {
            return None;
        }
    }
    let usec: u64 = usec?.parse().ok()?;
    if usec == 0 {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

/// Feed the watchdog for as long as the tokio runtime runs this task.
///
/// It runs on the service's own runtime on purpose: a runtime that stops scheduling tasks stops
/// feeding the watchdog, and systemd restarts the service. Returns at once when no watchdog is set.
pub async fn watchdog_loop() {
    let Some(every) = watchdog_interval() else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        // A failed send is not fatal: systemd notices the missing ping and restarts us.
        let _ = watchdog();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_is_half_the_watchdog() {
        assert_eq!(
            interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            interval_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
    }

    #[test]
    fn no_interval_for_another_pid_or_bad_values() {
        assert_eq!(interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(interval_from(Some("0"), None, 7), None);
        assert_eq!(interval_from(Some("x"), None, 7), None);
        assert_eq!(interval_from(None, None, 7), None);
    }

    #[test]
    fn datagram_reaches_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("ferry-sdnotify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let addr = socket_addr(path.to_str().unwrap()).unwrap();
        let sock = UnixDatagram::unbound().unwrap();
        sock.send_to_addr(b"READY=1", &addr).unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn datagram_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("ferry-sdnotify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let addr = socket_addr(&format!("@{name}")).unwrap();
        UnixDatagram::unbound()
            .unwrap()
            .send_to_addr(b"WATCHDOG=1", &addr)
            .unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn relative_socket_names_are_refused() {
        assert!(socket_addr("relative/path").is_err());
    }
}
