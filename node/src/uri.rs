//! `nbd://HOST[:PORT]/EXPORT` URIs, as the controller publishes them.

use std::fmt;

use nbd::consts::magic::DEFAULT_PORT;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("not an nbd:// URI: {0:?}")]
    Scheme(String),
    #[error("missing host in {0:?}")]
    Host(String),
    #[error("bad port in {0:?}")]
    Port(String),
    #[error("bad percent-encoding in the export name of {0:?}")]
    Escape(String),
}

/// Where an export lives and what it is called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub host: String,
    pub port: u16,
    pub export: String,
}

impl NbdUri {
    /// Parses the plain-TCP form of the NBD URI standard (`nbd://`), with
    /// IPv6 hosts in brackets and a percent-encoded export name.
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        let rest = uri.strip_prefix("nbd://").ok_or_else(|| UriError::Scheme(uri.into()))?;
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| UriError::Host(uri.into()))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(UriError::Host(uri.into()));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => p.parse().map_err(|_| UriError::Port(uri.into()))?,
        };
        let export = percent_decode(path).ok_or_else(|| UriError::Escape(uri.into()))?;
        Ok(Self { host: host.to_owned(), port, export })
    }

    /// `host:port` for connecting, brackets kept for IPv6.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for NbdUri {
    /// Shows the URI without the export name, which is a secret token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nbd://{}/<export>", self.authority())
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_port_export() {
        let u = NbdUri::parse("nbd://10.0.0.5:10900/vol-abc").unwrap();
        assert_eq!(u, NbdUri { host: "10.0.0.5".into(), port: 10900, export: "vol-abc".into() });
        assert_eq!(u.authority(), "10.0.0.5:10900");
    }

    #[test]
    fn default_port_and_empty_export() {
        let u = NbdUri::parse("nbd://node-a").unwrap();
        assert_eq!((u.port, u.export.as_str()), (10809, ""));
    }

    #[test]
    fn ipv6_and_escapes() {
        let u = NbdUri::parse("nbd://[::1]:2000/a%2Fb%20c").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.export.as_str()), ("::1", 2000, "a/b c"));
        assert_eq!(u.authority(), "[::1]:2000");
    }

    #[test]
    fn rejects_bad_uris() {
        assert!(matches!(NbdUri::parse("nbds://h/x"), Err(UriError::Scheme(_))));
        assert!(matches!(NbdUri::parse("nbd:///x"), Err(UriError::Host(_))));
        assert!(matches!(NbdUri::parse("nbd://h:99999/x"), Err(UriError::Port(_))));
        assert!(matches!(NbdUri::parse("nbd://h/%zz"), Err(UriError::Escape(_))));
    }

    #[test]
    fn display_hides_the_export_token() {
        let u = NbdUri::parse("nbd://h:1/secret").unwrap();
        assert!(!u.to_string().contains("secret"));
    }
}
