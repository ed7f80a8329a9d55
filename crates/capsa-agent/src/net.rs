//! The guest's loopback interface, brought up so that the workload API on
//! 127.0.0.1 is reachable.
//!
//! A fresh kernel starts with `lo` down and nothing else in the guest would
//! bring it up: there is no `ip` binary and no init system but the agent.
//! Containers share the guest's network namespace, so once `lo` is up a
//! server on 127.0.0.1 is reachable by the pod's containers and by nothing
//! else (the host has no network path into the guest).
//!
//! The request is one rtnetlink `RTM_NEWLINK` message that sets `IFF_UP`.
//! It is hand-written: no netlink crate is in the tree, and a netlink stack
//! would be far more code than the 32 bytes of this message and the 20 bytes
//! of its acknowledgement.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

/// `RTM_NEWLINK` from `<linux/rtnetlink.h>`.
const RTM_NEWLINK: u16 = 16;
/// `NLMSG_ERROR` from `<linux/netlink.h>`: the kernel's acknowledgement.
const NLMSG_ERROR: u16 = 2;
/// `NLM_F_REQUEST` from `<linux/netlink.h>`.
const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_ACK` from `<linux/netlink.h>`: ask for an `NLMSG_ERROR` reply even
/// on success, so that success is confirmed and not assumed.
const NLM_F_ACK: u16 = 0x4;
/// `IFF_UP` from `<linux/if.h>`.
const IFF_UP: u32 = 0x1;
/// `AF_UNSPEC`: `RTM_NEWLINK` on an existing link takes no address family.
const AF_UNSPEC: u8 = 0;
/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDR_LEN: usize = 16;
/// `sizeof(struct ifinfomsg)`.
const IFINFOMSG_LEN: usize = 16;
/// The sequence number of our one request, to match its acknowledgement.
const SEQ: u32 = 1;
/// How long to wait for the kernel's reply; it answers at once, so a longer
/// wait means something is wrong and PID 1 must not hang on it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How many unrelated messages to skip while looking for the acknowledgement.
const MAX_REPLIES: usize = 16;

/// Brings the guest's `lo` interface up.
///
/// # Errors
/// The socket could not be opened, `lo` does not exist, the request could
/// not be sent or answered, or the kernel refused it (its errno).
pub fn loopback_up() -> io::Result<()> {
    let fd = rustix::net::socket_with(AddressFamily::NETLINK, SocketType::RAW, SocketFlags::CLOEXEC, None)
        .map_err(|e| with_context(e.into(), "cannot open a NETLINK_ROUTE socket"))?;
    rustix::net::sockopt::set_socket_timeout(&fd, rustix::net::sockopt::Timeout::Recv, Some(REPLY_TIMEOUT))
        .map_err(|e| with_context(e.into(), "cannot set the netlink receive timeout"))?;
    // SIOCGIFINDEX works on any socket, the netlink one included (netdevice(7)).
    let index = rustix::net::netdevice::name_to_index(&fd, "lo")
        .map_err(|e| with_context(e.into(), "cannot find the index of interface lo"))?;
    let index = i32::try_from(index)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("interface index {index} is out of range")))?;
    let request = set_up_request(index, SEQ);
    rustix::net::send(&fd, &request, SendFlags::empty())
        .map_err(|e| with_context(e.into(), "cannot send the RTM_NEWLINK request"))?;
    await_ack(&fd, SEQ)
}

fn with_context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Reads replies until the acknowledgement of request `seq`.
fn await_ack(fd: impl AsFd, seq: u32) -> io::Result<()> {
    // The kernel copies the request into an error reply; 4 KiB holds it.
    let mut buf = [0_u8; 4096];
    for _ in 0..MAX_REPLIES {
        let (len, _) = rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty())
            .map_err(|e| with_context(e.into(), "no reply to the RTM_NEWLINK request"))?;
        let reply = buf.get(..len).unwrap_or_default();
        if let Some(result) = parse_ack(reply, seq)? {
            return result;
        }
    }
    Err(io::Error::new(io::ErrorKind::InvalidData, "the kernel never acknowledged the RTM_NEWLINK request"))
}

/// The `RTM_NEWLINK` request that sets `IFF_UP` on interface `index`:
/// an `nlmsghdr` and an `ifinfomsg`, in the host's byte order as netlink
/// wants.
fn set_up_request(index: i32, seq: u32) -> [u8; NLMSG_HDR_LEN + IFINFOMSG_LEN] {
    let mut msg = [0_u8; NLMSG_HDR_LEN + IFINFOMSG_LEN];
    let total = (NLMSG_HDR_LEN + IFINFOMSG_LEN) as u32;
    let fields: [&[u8]; 11] = [
        // struct nlmsghdr
        &total.to_ne_bytes(),
        &RTM_NEWLINK.to_ne_bytes(),
        &(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes(),
        &seq.to_ne_bytes(),
        &0_u32.to_ne_bytes(), // nlmsg_pid: 0, the kernel fills in ours
        // struct ifinfomsg
        &[AF_UNSPEC],
        &[0],                 // padding
        &0_u16.to_ne_bytes(), // ifi_type: unchanged
        &index.to_ne_bytes(),
        &IFF_UP.to_ne_bytes(), // ifi_flags
        &IFF_UP.to_ne_bytes(), // ifi_change: only IFF_UP is touched
    ];
    let mut at = 0;
    for field in fields {
        if let Some(dst) = msg.get_mut(at..at + field.len()) {
            dst.copy_from_slice(field);
        }
        at += field.len();
    }
    msg
}

/// Reads one reply datagram. `Ok(None)` when it holds no acknowledgement of
/// `seq`; `Ok(Some(result))` with the kernel's verdict when it does.
fn parse_ack(reply: &[u8], seq: u32) -> io::Result<Option<io::Result<()>>> {
    let mut rest = reply;
    while rest.len() >= NLMSG_HDR_LEN {
        let len = read_u32(rest, 0).unwrap_or_default() as usize;
        if len < NLMSG_HDR_LEN || len > rest.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("netlink reply with length {len} in a datagram of {} bytes", rest.len()),
            ));
        }
        let msg = rest.get(..len).unwrap_or_default();
        let kind = read_u16(msg, 4).unwrap_or_default();
        let msg_seq = read_u32(msg, 8).unwrap_or_default();
        if kind == NLMSG_ERROR && msg_seq == seq {
            // struct nlmsgerr begins with `int error`: 0 or a negative errno.
            let error = read_i32(msg, NLMSG_HDR_LEN).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "netlink error reply too short for its error code")
            })?;
            return Ok(Some(if error == 0 {
                Ok(())
            } else {
                Err(with_context(
                    io::Error::from_raw_os_error(error.saturating_neg()),
                    "the kernel refused to bring lo up",
                ))
            }));
        }
        // Messages are aligned to 4 bytes (NLMSG_ALIGN).
        let next = len.saturating_add(3) & !3;
        rest = rest.get(next..).unwrap_or_default();
    }
    Ok(None)
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn read_i32(buf: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout_matches_the_kernel_structs() {
        let msg = set_up_request(1, 7);
        let mut expected = Vec::new();
        expected.extend_from_slice(&32_u32.to_ne_bytes()); // nlmsg_len
        expected.extend_from_slice(&16_u16.to_ne_bytes()); // RTM_NEWLINK
        expected.extend_from_slice(&5_u16.to_ne_bytes()); // NLM_F_REQUEST | NLM_F_ACK
        expected.extend_from_slice(&7_u32.to_ne_bytes()); // seq
        expected.extend_from_slice(&0_u32.to_ne_bytes()); // pid
        expected.extend_from_slice(&[0, 0]); // family, pad
        expected.extend_from_slice(&0_u16.to_ne_bytes()); // ifi_type
        expected.extend_from_slice(&1_i32.to_ne_bytes()); // ifi_index
        expected.extend_from_slice(&1_u32.to_ne_bytes()); // ifi_flags = IFF_UP
        expected.extend_from_slice(&1_u32.to_ne_bytes()); // ifi_change = IFF_UP
        assert_eq!(msg.as_slice(), expected.as_slice());
    }

    /// An `NLMSG_ERROR` reply as the kernel writes it: header, error code,
    /// and the header of the request it answers.
    fn ack(seq: u32, error: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36_u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0x100_u16.to_ne_bytes()); // NLM_F_CAPPED
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&4242_u32.to_ne_bytes());
        m.extend_from_slice(&error.to_ne_bytes());
        m.extend_from_slice(set_up_request(1, seq).get(..16).unwrap());
        m
    }

    #[test]
    fn a_zero_error_is_success() {
        assert!(parse_ack(&ack(1, 0), 1).unwrap().unwrap().is_ok());
    }

    #[test]
    fn a_negative_errno_is_returned() {
        let err = parse_ack(&ack(1, -1), 1).unwrap().unwrap().unwrap_err();
        assert_eq!(err.raw_os_error(), None); // wrapped with context
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("lo"), "{err}");
    }

    #[test]
    fn other_sequence_numbers_are_skipped() {
        let mut two = ack(9, -1);
        two.extend_from_slice(&ack(1, 0));
        assert!(parse_ack(&two, 1).unwrap().unwrap().is_ok());
        assert!(parse_ack(&ack(9, 0), 1).unwrap().is_none());
    }

    #[test]
    fn malformed_replies_are_errors() {
        let mut bad = ack(1, 0);
        bad.get_mut(..4).unwrap().copy_from_slice(&200_u32.to_ne_bytes());
        assert!(parse_ack(&bad, 1).is_err());
        let mut short = ack(1, 0);
        short.get_mut(..4).unwrap().copy_from_slice(&18_u32.to_ne_bytes());
        short.truncate(18);
        assert!(parse_ack(&short, 1).is_err());
        assert!(parse_ack(&[1, 2, 3], 1).unwrap().is_none());
    }
}
