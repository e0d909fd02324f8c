// SPDX-License-Identifier: GPL-2.0-or-later
//! Debugging a replay in stock gdb: a GDB remote stub (the `gdbstub`
//! crate) over kernel-only replay. vCPUs are threads; breakpoints leave
//! guest memory alone, so the replay's checks stay on while debugging (a
//! divergence stops the session with its report); `reverse-stepi` and
//! `reverse-continue` re-execute the recording from its start to an exact
//! instruction count.

mod regs;
mod target;

pub use target::{describe_end, GdbError, ReplayTarget, StopReason, DEFAULT_SNAPSHOT_EVERY};

use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event, WaitForStopReasonError};
use gdbstub::stub::{DisconnectReason, GdbStub};
use gdbstub::target::Target;
use std::collections::VecDeque;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Where the stub waits for gdb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// `HOST:PORT`, or `:PORT` for 127.0.0.1.
    Tcp(String),
    /// A unix socket path (any argument with a `/`).
    Unix(PathBuf),
}

impl Listen {
    pub fn parse(s: &str) -> Listen {
        if s.contains('/') {
            Listen::Unix(PathBuf::from(s))
        } else if let Some(port) = s.strip_prefix(':') {
            Listen::Tcp(format!("127.0.0.1:{port}"))
        } else {
            Listen::Tcp(s.to_string())
        }
    }

    /// What to type after `target remote` in gdb.
    pub fn gdb_target(&self) -> String {
        match self {
            Listen::Tcp(addr) => addr.clone(),
            Listen::Unix(path) => path.display().to_string(),
        }
    }
}

/// The kernel's gdb helpers (`lx-dmesg`, `lx-ps`, ...), which the
/// project's kernel images keep beside `vmlinux`.
const KERNEL_GDB_SCRIPT: &str = "vmlinux-gdb.py";

/// `s` quoted for a POSIX shell.
fn shell_quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// gdb's setting for how long it waits for a reply: `monitor goto-*`
/// replays from the start (minutes on a long recording), and past gdb's
/// default of 2 s gdb retransmits and the session breaks.
pub const REMOTE_TIMEOUT: &str = "set remotetimeout 600";

/// The gdb command line that debugs through the stub at `target` with the
/// symbols of `vmlinux`; where the kernel's gdb helpers lie beside it,
/// gdb is first told that it may auto-load them from there.
pub fn gdb_command_line(target: &str, vmlinux: &Path) -> String {
    let mut cmd = String::from("gdb");
    let dir = vmlinux
        .parent()
        .filter(|d| d.join(KERNEL_GDB_SCRIPT).is_file());
    if let Some(dir) = dir {
        let safe = format!("add-auto-load-safe-path {}", dir.display());
        cmd += &format!(" -iex {}", shell_quoted(&safe));
    }
    let remote = format!("target remote {target}");
    cmd += &format!(
        " -ex {} -ex {} {}",
        shell_quoted(REMOTE_TIMEOUT),
        shell_quoted(&remote),
        shell_quoted(&vmlinux.display().to_string())
    );
    cmd
}

/// Why the `lx-*` commands will be missing with this `vmlinux`, if they
/// will.
pub fn missing_kernel_scripts(vmlinux: &Path) -> Option<String> {
    let dir = vmlinux.parent()?;
    if dir.join(KERNEL_GDB_SCRIPT).is_file() {
        return None;
    }
    Some(format!(
        "no {KERNEL_GDB_SCRIPT} beside {}: the kernel's gdb helpers (lx-dmesg, lx-ps, ...) are not loaded. \
         The project's kernel images keep them (an image cached without them is completed or rebuilt by \
         `cargo xtask images build`); for another kernel, build it with CONFIG_GDB_SCRIPTS=y and \
         `source` its build tree's {KERNEL_GDB_SCRIPT} in gdb",
        vmlinux.display()
    ))
}

type Conn = PacketFilter<Box<dyn ConnectionExt<Error = std::io::Error>>>;

/// The longest packet the stub takes; gdb's are far shorter.
const MAX_PACKET: usize = 1 << 20;

/// Checks the framing of what gdb sends before the stub sees it: bytes
/// that start no packet (line noise, a client that is not gdb) are
/// dropped, and a packet whose checksum is wrong is refused with `-` (gdb
/// sends it again); either would otherwise end the session.
pub struct PacketFilter<C> {
    inner: C,
    /// A checked packet, handed to the stub byte by byte.
    pending: VecDeque<u8>,
    dropped: u64,
    refused: u64,
}

impl<C: ConnectionExt> PacketFilter<C> {
    fn new(inner: C) -> Self {
        PacketFilter {
            inner,
            pending: VecDeque::new(),
            dropped: 0,
            refused: 0,
        }
    }

    fn drop_byte(&mut self, byte: u8) {
        self.dropped += 1;
        if self.dropped == 1 {
            eprintln!("krr: gdb stub: dropping bytes that start no packet ({byte:#04x} first)");
        }
    }

    /// Reads the rest of a packet after its `$`; queues it whole when its
    /// checksum is right, refuses it otherwise.
    fn take_packet(&mut self) -> Result<(), C::Error> {
        let mut body = Vec::new();
        loop {
            let b = self.inner.read()?;
            if b == b'#' {
                break;
            }
            if body.len() == MAX_PACKET {
                self.drop_byte(b'$');
                return Ok(());
            }
            body.push(b);
        }
        let digits = [self.inner.read()?, self.inner.read()?];
        let sum = body.iter().fold(0u8, |s, &b| s.wrapping_add(b));
        let given = std::str::from_utf8(&digits)
            .ok()
            .and_then(|d| u8::from_str_radix(d, 16).ok());
        if given == Some(sum) {
            self.pending.push_back(b'$');
            self.pending.extend(body);
            self.pending.push_back(b'#');
            self.pending.extend(digits);
        } else {
            self.refused += 1;
            eprintln!("krr: gdb stub: a packet with a wrong checksum refused");
            self.inner.write(b'-')?;
            self.inner.flush()?;
        }
        Ok(())
    }
}

impl<C: Connection> Connection for PacketFilter<C> {
    type Error = C::Error;

    fn write(&mut self, byte: u8) -> Result<(), Self::Error> {
        self.inner.write(byte)
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<(), Self::Error> {
        self.inner.write_all(buf)
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        self.inner.flush()
    }

    fn on_session_start(&mut self) -> Result<(), Self::Error> {
        self.inner.on_session_start()
    }
}

impl<C: ConnectionExt> ConnectionExt for PacketFilter<C> {
    fn read(&mut self) -> Result<u8, Self::Error> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Ok(b);
            }
            match self.inner.read()? {
                b @ (b'+' | b'-' | 0x03) => return Ok(b),
                b'$' => self.take_packet()?,
                other => self.drop_byte(other),
            }
        }
    }

    fn peek(&mut self) -> Result<Option<u8>, Self::Error> {
        loop {
            if let Some(&b) = self.pending.front() {
                return Ok(Some(b));
            }
            match self.inner.peek()? {
                Some(b'$' | b'+' | b'-' | 0x03) | None => return self.inner.peek(),
                Some(_) => {
                    let b = self.inner.read()?;
                    self.drop_byte(b);
                }
            }
        }
    }
}

enum ReplayEventLoop {}

impl BlockingEventLoop for ReplayEventLoop {
    type Target = ReplayTarget;
    type Connection = Conn;
    type StopReason = StopReason;

    #[allow(clippy::type_complexity)]
    fn wait_for_stop_reason(
        target: &mut ReplayTarget,
        conn: &mut Conn,
    ) -> Result<
        Event<StopReason>,
        WaitForStopReasonError<<ReplayTarget as Target>::Error, <Conn as Connection>::Error>,
    > {
        loop {
            if conn
                .peek()
                .map_err(WaitForStopReasonError::Connection)?
                .is_some()
            {
                let byte = conn.read().map_err(WaitForStopReasonError::Connection)?;
                return Ok(Event::IncomingData(byte));
            }
            if let Some(stop) = target.advance().map_err(WaitForStopReasonError::Target)? {
                return Ok(Event::TargetStopped(stop));
            }
        }
    }

    fn on_interrupt(target: &mut ReplayTarget) -> Result<Option<StopReason>, GdbError> {
        Ok(Some(target.interrupt()))
    }
}

/// Waits for one gdb connection on `listen` (after `ready` was told the
/// address), then serves it until gdb detaches or kills the session.
/// Returns how the session ended, in words.
pub fn serve(
    target: &mut ReplayTarget,
    listen: &Listen,
    ready: impl FnOnce(&str),
) -> Result<String, GdbError> {
    let io = |e: std::io::Error| GdbError::Other(format!("{}: {e}", listen.gdb_target()));
    let conn: Box<dyn ConnectionExt<Error = std::io::Error>> = match listen {
        Listen::Tcp(addr) => {
            let l = TcpListener::bind(addr).map_err(io)?;
            ready(&l.local_addr().map_err(io)?.to_string());
            Box::new(l.accept().map_err(io)?.0)
        }
        Listen::Unix(path) => {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
            }
            let l = UnixListener::bind(path).map_err(io)?;
            ready(&path.display().to_string());
            Box::new(l.accept().map_err(io)?.0)
        }
    };
    match GdbStub::new(PacketFilter::new(conn)).run_blocking::<ReplayEventLoop>(target) {
        Ok(DisconnectReason::Disconnect) => Ok("gdb detached".into()),
        Ok(DisconnectReason::Kill) => Ok("gdb killed the session".into()),
        Ok(DisconnectReason::TargetExited(code)) => Ok(format!("the target exited ({code})")),
        Ok(DisconnectReason::TargetTerminated(sig)) => Ok(format!("the target ended ({sig})")),
        Err(e) if e.is_connection_error() => {
            let (err, _) = e.into_connection_error().expect("a connection error");
            use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
            if matches!(err.kind(), UnexpectedEof | BrokenPipe | ConnectionReset) {
                Ok("gdb disconnected".into())
            } else {
                Err(GdbError::Other(format!("gdb connection: {err}")))
            }
        }
        Err(e) if e.is_target_error() => Err(e.into_target_error().expect("a target error")),
        Err(e) => Err(GdbError::Other(format!("gdb session: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_gdb_command_auto_loads_the_kernels_helpers_where_they_are() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("it's here");
        std::fs::create_dir(&dir).unwrap();
        let vmlinux = dir.join("vmlinux");
        std::fs::write(&vmlinux, "ELF").unwrap();
        let plain = gdb_command_line(":1234", &vmlinux);
        assert!(!plain.contains("auto-load"), "{plain}");
        assert!(missing_kernel_scripts(&vmlinux)
            .unwrap()
            .contains("lx-dmesg"));
        std::fs::write(dir.join(KERNEL_GDB_SCRIPT), "import linux").unwrap();
        let cmd = gdb_command_line(":1234", &vmlinux);
        let quoted_dir = dir.display().to_string().replace('\'', "'\\''");
        assert_eq!(
            cmd,
            format!(
                "gdb -iex 'add-auto-load-safe-path {quoted_dir}' -ex 'set remotetimeout 600' -ex 'target remote :1234' '{}'",
                vmlinux.display().to_string().replace('\'', "'\\''")
            )
        );
        assert!(missing_kernel_scripts(&vmlinux).is_none());
    }

    /// A connection fed from a byte string, keeping what is written.
    struct Bytes(VecDeque<u8>, Vec<u8>);

    impl Connection for Bytes {
        type Error = std::io::Error;
        fn write(&mut self, byte: u8) -> std::io::Result<()> {
            self.1.push(byte);
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl ConnectionExt for Bytes {
        fn read(&mut self) -> std::io::Result<u8> {
            self.0
                .pop_front()
                .ok_or_else(|| std::io::ErrorKind::UnexpectedEof.into())
        }
        fn peek(&mut self) -> std::io::Result<Option<u8>> {
            Ok(self.0.front().copied())
        }
    }

    #[test]
    fn noise_is_dropped_and_a_bad_checksum_is_refused() {
        let input = b"xy+$qS#ab$g#67z\x03$?#00$?#3f-";
        let mut f = PacketFilter::new(Bytes(input.iter().copied().collect(), Vec::new()));
        let mut passed = Vec::new();
        while f.peek().unwrap().is_some() {
            passed.push(f.read().unwrap());
        }
        // `qS` has checksum 0xe4, not 0xab; `?` has 0x3f, not 0x00.
        assert_eq!(passed, b"+$g#67\x03$?#3f-");
        assert_eq!((f.dropped, f.refused), (3, 2));
        assert_eq!(f.inner.1, b"--", "one - per refused packet");
    }

    #[test]
    fn listen_addresses_parse_as_tcp_or_unix() {
        assert_eq!(Listen::parse(":1234"), Listen::Tcp("127.0.0.1:1234".into()));
        assert_eq!(
            Listen::parse("0.0.0.0:99"),
            Listen::Tcp("0.0.0.0:99".into())
        );
        assert_eq!(
            Listen::parse("/tmp/krr.sock"),
            Listen::Unix("/tmp/krr.sock".into())
        );
    }
}
