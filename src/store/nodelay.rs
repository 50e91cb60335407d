//! `TCP_NODELAY` on the database connections.
//!
//! sqlx 0.9.0 opens its TCP connections with Nagle's algorithm on (a regression upstream:
//! transact-rs/sqlx issue 4335, fixed by pull request 4336 after 0.9.0, not yet released). A
//! statement larger than one TCP segment then waits for the server's delayed acknowledgement of
//! the first segment before its last one is sent: 40 ms on Linux. The worker's write statement
//! carries a batch's outcomes, and on this machine 10% of batches lost those 40 ms (issue 15,
//! docs/PERFORMANCE.md). sqlx gives no access to its socket, so after it opens a connection the
//! worker finds its own TCP sockets connected to the database's port (on Linux, through
//! `/proc/self/fd`) and sets the option on them. Elsewhere nothing is done. Remove this once
//! sqlx sets the option again.

/// Sets `TCP_NODELAY` on every TCP socket of this process connected to `port` that does not
/// have it; returns how many it set.
#[cfg(target_os = "linux")]
pub(super) fn set_on_sockets_to(port: u16) -> usize {
    use std::os::fd::BorrowedFd;
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let mut set = 0;
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: the descriptor was open a moment ago and is only borrowed for three system
        // calls. Had another thread closed it since, they fail (EBADF); had the number been
        // reused, they fail on anything that is not a socket, and on a socket they change
        // nothing unless it is a TCP connection to the database's port, which is what we want.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let to_database = socket
            .peer_addr()
            .ok()
            .and_then(|address| address.as_socket())
            .is_some_and(|address| address.port() == port);
        if to_database
            && socket.tcp_nodelay().is_ok_and(|on| !on)
            && socket.set_tcp_nodelay(true).is_ok()
        {
            set += 1;
        }
    }
    set
}

/// Elsewhere: nothing.
#[cfg(not(target_os = "linux"))]
pub(super) fn set_on_sockets_to(_port: u16) -> usize {
    0
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::set_on_sockets_to;

    #[test]
    fn sets_the_option_on_connections_to_the_port_and_only_those() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let to_port = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let elsewhere = std::net::TcpStream::connect(other.local_addr().unwrap()).unwrap();
        assert!(!to_port.nodelay().unwrap(), "Nagle is on by default");
        assert!(set_on_sockets_to(port) >= 1);
        assert!(to_port.nodelay().unwrap());
        assert!(!elsewhere.nodelay().unwrap(), "another port is left alone");
        assert_eq!(set_on_sockets_to(port), 0, "nothing left to set");
    }
}
