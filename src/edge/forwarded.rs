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
/// names no address (`unknown`, `_hidden`, garbage) is `None`; so is a whole `Forwarded` line
/// that does not follow RFC 7239's grammar (an unclosed quote must not swallow the elements a
/// proxy appended after it).
pub fn hops(headers: &HeaderMap, header: RealIpHeader) -> Vec<Option<IpAddr>> {
    let name = match header {
        RealIpHeader::XForwardedFor => "x-forwarded-for",
        RealIpHeader::Forwarded => "forwarded",
    };
    let mut out = Vec::new();
    for value in headers.get_all(name) {
        match header {
            RealIpHeader::XForwardedFor => {
                // Item by item: one unreadable item does not hide the others.
                out.extend(value.as_bytes().split(|&b| b == b',').map(|item| {
                    std::str::from_utf8(item)
                        .ok()
                        .and_then(|item| address(item.trim()))
                }));
            }
            RealIpHeader::Forwarded => match value.to_str().ok().and_then(forwarded_line) {
                Some(hops) => out.extend(hops),
                None => out.push(None),
            },
        }
    }
    out
}

/// One `Forwarded` line (RFC 7239 §4: `forwarded-element *( OWS "," OWS forwarded-element )`,
/// each element `pair *( ";" pair )`, each pair `token "=" ( token / quoted-string )`): the
/// `for=` address of each element, `None` for an element without one or with it twice. `None`
/// for a line that does not parse.
fn forwarded_line(line: &str) -> Option<Vec<Option<IpAddr>>> {
    let mut hops = Vec::new();
    let mut rest = line.trim_start_matches([' ', '\t']);
    loop {
        // Empty list elements are allowed (RFC 9110 §5.6.1).
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            return Some(hops);
        }
        let mut found: Option<Option<IpAddr>> = None;
        let mut repeated = false;
        loop {
            let key_len = rest.find(|c: char| !is_tchar(c)).unwrap_or(rest.len());
            let key = &rest[..key_len];
            rest = rest[key_len..].strip_prefix('=')?;
            if key.is_empty() {
                return None;
            }
            let value;
            (value, rest) = token_or_quoted(rest)?;
            if key.eq_ignore_ascii_case("for") {
                repeated |= found.is_some();
                found = Some(address(&value));
            }
            match rest.chars().next() {
                Some(';') => rest = &rest[1..],
                _ => break,
            }
        }
        hops.push(if repeated { None } else { found.flatten() });
        rest = rest.trim_start_matches([' ', '\t']);
        match rest.chars().next() {
            None => return Some(hops),
            Some(',') => {}
            Some(_) => return None,
        }
    }
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// A token or a quoted-string (escapes undone) at the start of `s`, and what follows it.
fn token_or_quoted(s: &str) -> Option<(String, &str)> {
    let Some(quoted) = s.strip_prefix('"') else {
        let len = s.find(|c: char| !is_tchar(c)).unwrap_or(s.len());
        return (len > 0).then(|| (s[..len].to_string(), &s[len..]));
    };
    let mut out = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &quoted[i + 1..])),
            '\\' => out.push(chars.next()?.1),
            c => out.push(c),
        }
    }
    None
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
    fn a_client_cannot_hide_a_proxys_element_in_an_unclosed_quote() {
        let trusted = nets(&["10.0.0.0/8"]);
        // The proxy appended its element to the client's line: the line is malformed, so the
        // walk stops at the proxy that reported it, never at the client's claim.
        let h = headers(&[("forwarded", r#"for=6.6.6.6;x=", for=198.51.100.9"#)]);
        assert_eq!(hops(&h, FWD), vec![None]);
        assert_eq!(
            client_addr(ip("10.1.1.1"), &h, &trusted, FWD),
            ip("10.1.1.1")
        );
        for bad in [
            r#"for=1.2.3.4 for=5.6.7.8"#,
            "for",
            "=x",
            "for=\"",
            "for=1.2.3.4;",
        ] {
            let h = headers(&[("forwarded", bad)]);
            assert_eq!(hops(&h, FWD), vec![None], "{bad}");
        }
        // A parameter twice in one element names nobody.
        let h = headers(&[("forwarded", "for=6.6.6.6;for=198.51.100.9")]);
        assert_eq!(hops(&h, FWD), vec![None]);
        // Empty list elements are fine.
        let h = headers(&[("forwarded", " , for=192.0.2.1 ,, for=192.0.2.2 ")]);
        assert_eq!(
            hops(&h, FWD),
            vec![Some(ip("192.0.2.1")), Some(ip("192.0.2.2"))]
        );
    }

    #[test]
    fn an_unreadable_x_forwarded_for_item_hides_only_itself() {
        let trusted = nets(&["10.0.0.0/8"]);
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\xff\xfe, 198.51.100.9").unwrap(),
        );
        assert_eq!(hops(&h, XFF), vec![None, Some(ip("198.51.100.9"))]);
        assert_eq!(
            client_addr(ip("10.1.1.1"), &h, &trusted, XFF),
            ip("198.51.100.9")
        );
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
