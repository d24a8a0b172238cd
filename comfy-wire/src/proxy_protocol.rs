//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, version 1 text and version 2 binary): a
//! load balancer that passes TCP through (AWS NLB, HAProxy `send-proxy`) opens each connection
//! with one header naming the client's address. The header is parsed by `ppp`; this module
//! frames it on the stream, reading exactly its bytes and not one byte of the request after it,
//! within the bounds the specification sets (107 bytes for v1; 16 plus the stated length for
//! v2, which this reader caps at [`MAX_V2_LENGTH`]).
//!
//! Client bytes reach it unchecked: it is a fuzz target (`fuzz/`).

use std::net::SocketAddr;

use ppp::HeaderResult;
use tokio::io::{AsyncRead, AsyncReadExt};

/// A version 1 header's longest form, `\r\n` included (the specification's 107 bytes).
pub const MAX_V1_LENGTH: usize = 107;
/// The longest version 2 header read (its fixed 16 bytes, addresses and TLVs): the stated
/// length may say up to 65,535 bytes, but addresses need at most 216 and load balancers add a
/// few TLVs.
pub const MAX_V2_LENGTH: usize = 4096;
/// The 12 bytes every version 2 header starts with.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// What a PROXY header says about the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    /// Relayed for a client at this address (v1 `TCP4`/`TCP6`, v2 `PROXY` over IPv4 or IPv6).
    Client(SocketAddr),
    /// The connection is the proxy's own (v2 `LOCAL`, a health check) or its addresses are
    /// unknown or not IP (v1 `UNKNOWN`, v2 unspecified or UNIX): the TCP peer stands.
    Own,
}

/// Why a connection's PROXY header was refused (the connection is then closed).
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("PROXY protocol header longer than {0} bytes")]
    TooLong(usize),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one PROXY header (v1 or v2) from the start of `stream`, consuming exactly its bytes.
pub async fn read_header<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<ProxyHeader, ProxyHeaderError> {
    let mut buf = vec![0u8; 5];
    stream.read_exact(&mut buf).await?;
    if buf == b"PROXY" {
        // v1: up to `\r\n`, byte by byte so nothing after it is taken.
        while !buf.ends_with(b"\r\n") {
            if buf.len() >= MAX_V1_LENGTH {
                return Err(ProxyHeaderError::TooLong(MAX_V1_LENGTH));
            }
            buf.push(stream.read_u8().await?);
        }
    } else if buf[..] == V2_SIGNATURE[..5] {
        buf.resize(16, 0);
        stream.read_exact(&mut buf[5..]).await?;
        if buf[..12] != V2_SIGNATURE[..] {
            return Err(ProxyHeaderError::Missing);
        }
        let length = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if 16 + length > MAX_V2_LENGTH {
            return Err(ProxyHeaderError::TooLong(MAX_V2_LENGTH));
        }
        buf.resize(16 + length, 0);
        stream.read_exact(&mut buf[16..]).await?;
    } else {
        return Err(ProxyHeaderError::Missing);
    }
    parse(&buf)
}

/// Parses one complete header (exactly its bytes).
pub fn parse(header: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    let malformed = |e: &dyn std::fmt::Display| ProxyHeaderError::Malformed(e.to_string());
    match HeaderResult::parse(header) {
        HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            ppp::v1::Addresses::Tcp4(a) => {
                ProxyHeader::Client(SocketAddr::from((a.source_address, a.source_port)))
            }
            ppp::v1::Addresses::Tcp6(a) => {
                ProxyHeader::Client(SocketAddr::from((a.source_address, a.source_port)))
            }
            ppp::v1::Addresses::Unknown => ProxyHeader::Own,
        }),
        HeaderResult::V2(Ok(h)) => Ok(match (h.command, h.addresses) {
            (ppp::v2::Command::Local, _) => ProxyHeader::Own,
            (_, ppp::v2::Addresses::IPv4(a)) => {
                ProxyHeader::Client(SocketAddr::from((a.source_address, a.source_port)))
            }
            (_, ppp::v2::Addresses::IPv6(a)) => {
                ProxyHeader::Client(SocketAddr::from((a.source_address, a.source_port)))
            }
            _ => ProxyHeader::Own,
        }),
        HeaderResult::V1(Err(e)) => Err(malformed(&e)),
        HeaderResult::V2(Err(e)) => Err(malformed(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<ProxyHeader, ProxyHeaderError>, Vec<u8>) {
        let mut rest = bytes;
        let header = read_header(&mut rest).await;
        (header, rest.to_vec())
    }

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend(((addresses.len() + tlvs.len()) as u16).to_be_bytes());
        h.extend(addresses);
        h.extend(tlvs);
        h
    }

    #[tokio::test]
    async fn a_v1_header_names_the_client_and_leaves_the_request() {
        let (h, rest) =
            read(b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 8188\r\nGET / HTTP/1.1\r\n").await;
        assert_eq!(
            h.unwrap(),
            ProxyHeader::Client("198.51.100.7:40000".parse().unwrap())
        );
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        let (h, _) = read(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 8188\r\n").await;
        assert_eq!(
            h.unwrap(),
            ProxyHeader::Client("[2001:db8::7]:40000".parse().unwrap())
        );
        let (h, rest) = read(b"PROXY UNKNOWN\r\nX").await;
        assert_eq!((h.unwrap(), rest), (ProxyHeader::Own, b"X".to_vec()));
    }

    #[tokio::test]
    async fn a_v2_header_names_the_client_or_is_the_proxys_own() {
        let mut addrs = vec![198, 51, 100, 7, 10, 0, 0, 1];
        addrs.extend(40000u16.to_be_bytes());
        addrs.extend(8188u16.to_be_bytes());
        let mut bytes = v2(1, 0x11, &addrs, &[0x04, 0x00, 0x01, 0x00]);
        bytes.extend(b"GET /");
        let (h, rest) = read(&bytes).await;
        assert_eq!(
            h.unwrap(),
            ProxyHeader::Client("198.51.100.7:40000".parse().unwrap())
        );
        assert_eq!(rest, b"GET /");
        let (h, _) = read(&v2(0, 0x00, &[], &[])).await;
        assert_eq!(h.unwrap(), ProxyHeader::Own, "LOCAL: a health check");
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\n").await.0,
            Err(ProxyHeaderError::Missing)
        ));
        assert!(matches!(
            read(b"PROX").await.0,
            Err(ProxyHeaderError::Io(_))
        ));
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(
            read(&long).await.0,
            Err(ProxyHeaderError::TooLong(107))
        ));
        assert!(matches!(
            read(b"PROXY TCP4 999.1.1.1 10.0.0.1 1 2\r\n").await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend([0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(
            read(&huge).await.0,
            Err(ProxyHeaderError::TooLong(_))
        ));
        let mut wrong = V2_SIGNATURE.to_vec();
        wrong[7] = b'X';
        wrong.extend([0x21, 0x11, 0, 0]);
        assert!(matches!(
            read(&wrong).await.0,
            Err(ProxyHeaderError::Missing)
        ));
    }
}
