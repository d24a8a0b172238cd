//! The client's address behind trusted proxies, as nginx's `realip` module finds it with
//! `set_real_ip_from`, `real_ip_header` and `real_ip_recursive on`: a request from a peer that
//! is not a trusted proxy is that peer; one from a trusted proxy names the client in one
//! header (the operator says which: a proxy passes the other through untouched, so reading both
//! would let a client choose), walked right to left past every trusted hop to the first one that
//! is not. Headers from untrusted peers are never read.
//!
//! `X-Forwarded-For` is the de-facto list of addresses (`client, proxy1, proxy2`; each hop
//! appends its peer). `Forwarded` is RFC 7239: elements separated by `,`, pairs by `;`, the
//! address in `for=`, quoted when it carries a port or is IPv6 (`for="[2001:db8::1]:4711"`),
//! or an obfuscated identifier (`for=_hidden`, `for=unknown`). Both may be repeated header
//! lines, read as one list in order (RFC 9110 §5.3).
//!
//! Client bytes reach these functions unchecked: they are a fuzz target (`fuzz/`).

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

pub use crate::config::RealIpHeader;

/// The addresses a request passed through, client first, as `header` lists them. A hop that
/// names no address (`unknown`, `_hidden`, garbage) is `None`.
pub fn hops(headers: &HeaderMap, header: RealIpHeader) -> Vec<Option<IpAddr>> {
    let name = match header {
        RealIpHeader::XForwardedFor => "x-forwarded-for",
        RealIpHeader::Forwarded => "forwarded",
    };
    let mut out = Vec::new();
    for value in headers.get_all(name) {
        let Ok(value) = value.to_str() else {
            // Not visible ASCII: one hop nobody can read.
            out.push(None);
            continue;
        };
        match header {
            RealIpHeader::XForwardedFor => {
                out.extend(value.split(',').map(|item| address(item.trim())));
            }
            RealIpHeader::Forwarded => {
                out.extend(split_outside_quotes(value, ',').into_iter().map(|element| {
                    split_outside_quotes(element, ';')
                        .into_iter()
                        .find_map(|pair| {
                            let (key, value) = pair.split_once('=')?;
                            key.trim()
                                .eq_ignore_ascii_case("for")
                                .then(|| address(&unquote(value.trim())))
                        })?
                }));
            }
        }
    }
    out
}

/// The client's address: `peer` unless it is in `trusted`; then the hops of `header`, right to
/// left, past every trusted address, to the first untrusted one. A hop that names no address
/// stops the walk at the last address known (the trusted hop that reported it), as does a
/// list that is empty; a list of trusted addresses only gives its leftmost.
pub fn client_addr(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    header: RealIpHeader,
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| is_trusted(trusted, *ip);
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    for hop in hops(headers, header).into_iter().rev() {
        let Some(ip) = hop else { break };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
}

/// Whether `ip` (an IPv4-mapped IPv6 address as the IPv4 address it is) is in `trusted`.
pub fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    trusted.iter().any(|net| net.contains(&canonical(ip)))
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, what a dual-stack listener reports) as the
/// IPv4 address it is, so `10.0.0.0/8` matches it.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One hop's address: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]` or
/// `[2001:db8::1]:80`; anything else is `None`.
fn address(item: &str) -> Option<IpAddr> {
    if let Ok(ip) = item.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(sa) = item.parse::<SocketAddr>() {
        return Some(canonical(sa.ip()));
    }
    let inner = item.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<IpAddr>().ok().map(canonical)
}

/// `s` split at `sep`, except inside a quoted-string (RFC 9110 §5.6.4, with `\` escapes).
fn split_outside_quotes(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            parts.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    parts.push(&s[start..]);
    parts
}

/// A token or a quoted-string's content (escapes undone).
fn unquote(v: &str) -> String {
    let Some(inner) = v.strip_prefix('"').and_then(|r| r.strip_suffix('"')) else {
        return v.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const XFF: RealIpHeader = RealIpHeader::XForwardedFor;
    const FWD: RealIpHeader = RealIpHeader::Forwarded;

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let h = headers(&[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2")]);
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_addr(ip("203.0.113.7"), &h, &trusted, XFF),
            ip("203.0.113.7")
        );
        assert_eq!(
            client_addr(ip("203.0.113.7"), &h, &trusted, FWD),
            ip("203.0.113.7")
        );
        assert_eq!(
            client_addr(ip("10.0.0.1"), &h, &[], XFF),
            ip("10.0.0.1"),
            "none trusted"
        );
    }

    #[test]
    fn the_walk_goes_right_to_left_past_trusted_hops() {
        let trusted = nets(&["10.0.0.0/8", "192.168.1.5/32"]);
        // A client spoofs 6.6.6.6; the first proxy appends the client's real address.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.9, 192.168.1.5")]);
        assert_eq!(
            client_addr(ip("10.1.1.1"), &h, &trusted, XFF),
            ip("198.51.100.9")
        );
        // Repeated header lines are one list, in order.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "198.51.100.9, 10.2.2.2"),
        ]);
        assert_eq!(
            client_addr(ip("10.1.1.1"), &h, &trusted, XFF),
            ip("198.51.100.9")
        );
        // Every hop trusted: the leftmost.
        let h = headers(&[("x-forwarded-for", "10.3.3.3, 10.2.2.2")]);
        assert_eq!(
            client_addr(ip("10.1.1.1"), &h, &trusted, XFF),
            ip("10.3.3.3")
        );
    }

    #[test]
    fn no_header_or_an_unreadable_hop_stops_at_the_last_known_address() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_addr(ip("10.1.1.1"), &HeaderMap::new(), &trusted, XFF),
            ip("10.1.1.1")
        );
        let h = headers(&[("x-forwarded-for", "198.51.100.9, garbage, 10.2.2.2")]);
        assert_eq!(
            client_addr(ip("10.1.1.1"), &h, &trusted, XFF),
            ip("10.2.2.2")
        );
        let h = headers(&[("x-forwarded-for", "")]);
        assert_eq!(
            client_addr(ip("10.1.1.1"), &h, &trusted, XFF),
            ip("10.1.1.1")
        );
    }

    #[test]
    fn only_the_configured_header_counts() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&[
            ("x-forwarded-for", "198.51.100.9"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        assert_eq!(
            client_addr(ip("10.1.1.1"), &h, &trusted, XFF),
            ip("198.51.100.9")
        );
        assert_eq!(
            client_addr(ip("10.1.1.1"), &h, &trusted, FWD),
            ip("6.6.6.6")
        );
    }

    #[test]
    fn forwarded_reads_rfc_7239_addresses_ports_quotes_and_obfuscation() {
        let h = headers(&[(
            "forwarded",
            r#"for=192.0.2.43, for="[2001:db8:cafe::17]:4711";proto=https, for=unknown, by=10.0.0.1;for="198.51.100.1:80""#,
        )]);
        assert_eq!(
            hops(&h, FWD),
            vec![
                Some(ip("192.0.2.43")),
                Some(ip("2001:db8:cafe::17")),
                None,
                Some(ip("198.51.100.1"))
            ]
        );
        // A comma or semicolon inside quotes does not split.
        let h = headers(&[("forwarded", r#"for="_a,b;c", For=192.0.2.1"#)]);
        assert_eq!(hops(&h, FWD), vec![None, Some(ip("192.0.2.1"))]);
        let h = headers(&[("forwarded", r#"proto=http"#)]);
        assert_eq!(hops(&h, FWD), vec![None]);
    }

    #[test]
    fn x_forwarded_for_takes_bare_bracketed_and_ported_addresses() {
        let h = headers(&[(
            "x-forwarded-for",
            "192.0.2.1:8080, [2001:db8::2]:9, [2001:db8::3], 2001:db8::4, ::ffff:10.0.0.1",
        )]);
        assert_eq!(
            hops(&h, XFF),
            vec![
                Some(ip("192.0.2.1")),
                Some(ip("2001:db8::2")),
                Some(ip("2001:db8::3")),
                Some(ip("2001:db8::4")),
                Some(ip("10.0.0.1")),
            ]
        );
    }

    #[test]
    fn a_mapped_peer_matches_an_ipv4_network() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "198.51.100.9")]);
        assert_eq!(
            client_addr(ip("::ffff:10.0.0.1"), &h, &trusted, XFF),
            ip("198.51.100.9")
        );
    }
}
