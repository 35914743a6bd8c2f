//! Where Braze is: a Braze instance name (`US-03`) becomes its REST endpoint
//! (`https://rest.iad-03.braze.com`), or an explicit URL is accepted when it is HTTPS (plain HTTP
//! only on loopback, for the simulator and local tests).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use reqwest::Url;

/// A Braze instance (cluster), as shown in the dashboard under Settings > APIs and Identifiers.
///
/// Table from <https://www.braze.com/docs/api/basics> (there is no US-09).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Instance {
    /// US-01.
    Us01,
    /// US-02.
    Us02,
    /// US-03.
    Us03,
    /// US-04.
    Us04,
    /// US-05.
    Us05,
    /// US-06.
    Us06,
    /// US-07.
    Us07,
    /// US-08.
    Us08,
    /// US-10.
    Us10,
    /// EU-01.
    Eu01,
    /// EU-02.
    Eu02,
    /// AU-01.
    Au01,
    /// ID-01.
    Id01,
    /// JP-01.
    Jp01,
    /// KR-01.
    Kr01,
}

impl Instance {
    /// Every known instance, in the order Braze lists them.
    pub const ALL: [Instance; 15] = [
        Instance::Us01,
        Instance::Us02,
        Instance::Us03,
        Instance::Us04,
        Instance::Us05,
        Instance::Us06,
        Instance::Us07,
        Instance::Us08,
        Instance::Us10,
        Instance::Eu01,
        Instance::Eu02,
        Instance::Au01,
        Instance::Id01,
        Instance::Jp01,
        Instance::Kr01,
    ];

    /// The instance's name as Braze writes it (`US-03`).
    pub fn name(self) -> &'static str {
        match self {
            Instance::Us01 => "US-01",
            Instance::Us02 => "US-02",
            Instance::Us03 => "US-03",
            Instance::Us04 => "US-04",
            Instance::Us05 => "US-05",
            Instance::Us06 => "US-06",
            Instance::Us07 => "US-07",
            Instance::Us08 => "US-08",
            Instance::Us10 => "US-10",
            Instance::Eu01 => "EU-01",
            Instance::Eu02 => "EU-02",
            Instance::Au01 => "AU-01",
            Instance::Id01 => "ID-01",
            Instance::Jp01 => "JP-01",
            Instance::Kr01 => "KR-01",
        }
    }

    /// The instance's REST endpoint (no trailing slash).
    pub fn rest_endpoint(self) -> &'static str {
        match self {
            Instance::Us01 => "https://rest.iad-01.braze.com",
            Instance::Us02 => "https://rest.iad-02.braze.com",
            Instance::Us03 => "https://rest.iad-03.braze.com",
            Instance::Us04 => "https://rest.iad-04.braze.com",
            Instance::Us05 => "https://rest.iad-05.braze.com",
            Instance::Us06 => "https://rest.iad-06.braze.com",
            Instance::Us07 => "https://rest.iad-07.braze.com",
            Instance::Us08 => "https://rest.iad-08.braze.com",
            Instance::Us10 => "https://rest.us-10.braze.com",
            Instance::Eu01 => "https://rest.fra-01.braze.eu",
            Instance::Eu02 => "https://rest.fra-02.braze.eu",
            Instance::Au01 => "https://rest.au-01.braze.com",
            Instance::Id01 => "https://rest.id-01.braze.com",
            Instance::Jp01 => "https://rest.jp-01.braze.com",
            Instance::Kr01 => "https://rest.kr-01.braze.com",
        }
    }
}

impl fmt::Display for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Instance {
    type Err = EndpointError;

    /// Accepts `US-03`, `us-03`, `us03` and `US_03`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted: String = s
            .trim()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_uppercase())
            .collect();
        Instance::ALL
            .into_iter()
            .find(|i| i.name().replace('-', "") == wanted)
            .ok_or_else(|| EndpointError::UnknownInstance {
                name: s.to_string(),
            })
    }
}

/// Why an endpoint setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// Not one of the instances Braze lists.
    #[error(
        "unknown Braze instance {name:?}: expected one of US-01..US-08, US-10, EU-01, EU-02, \
         AU-01, ID-01, JP-01, KR-01, or an https:// REST endpoint URL"
    )]
    UnknownInstance {
        /// What was given.
        name: String,
    },
    /// Not a URL.
    #[error("Braze endpoint {url:?} is not a valid URL: {reason}")]
    InvalidUrl {
        /// What was given.
        url: String,
        /// The parser's reason.
        reason: String,
    },
    /// Plain HTTP (or another scheme) to a host that is not loopback.
    #[error(
        "Braze endpoint {url:?} must use https:// (plain http is accepted only for loopback \
         hosts such as 127.0.0.1, ::1 or localhost)"
    )]
    Insecure {
        /// What was given.
        url: String,
    },
    /// The URL carries credentials, a query or a fragment.
    #[error("Braze endpoint {url:?} must be a plain base URL without user info, query or fragment")]
    NotABaseUrl {
        /// What was given (user info removed).
        url: String,
    },
}

/// A validated Braze REST base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Base URL, always ending with `/`.
    base: String,
    /// `host[:port]`, for messages.
    host: String,
    instance: Option<Instance>,
}

impl Endpoint {
    /// The endpoint of a known instance.
    pub fn for_instance(instance: Instance) -> Self {
        let base = format!("{}/", instance.rest_endpoint());
        let host = base
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        Self {
            base,
            host,
            instance: Some(instance),
        }
    }

    /// Parses an instance name (`US-03`) or an explicit base URL (`https://rest.iad-03.braze.com`,
    /// `http://127.0.0.1:4010` for the simulator).
    pub fn parse(s: &str) -> Result<Self, EndpointError> {
        let s = s.trim();
        if !s.contains("://") {
            return s.parse::<Instance>().map(Self::for_instance);
        }
        let url = Url::parse(s).map_err(|e| EndpointError::InvalidUrl {
            url: redact_userinfo(s),
            reason: e.to_string(),
        })?;
        if !url.username().is_empty()
            || url.password().is_some()
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(EndpointError::NotABaseUrl {
                url: redact_userinfo(s),
            });
        }
        let host_str = url.host_str().unwrap_or("");
        match url.scheme() {
            "https" if !host_str.is_empty() => {}
            "http" if is_loopback_host(host_str) => {}
            _ => {
                return Err(EndpointError::Insecure { url: s.to_string() });
            }
        }
        let mut base = url.as_str().to_string();
        if !base.ends_with('/') {
            base.push('/');
        }
        let host = match url.port() {
            Some(p) => format!("{host_str}:{p}"),
            None => host_str.to_string(),
        };
        let instance = Instance::ALL
            .into_iter()
            .find(|i| format!("{}/", i.rest_endpoint()) == base);
        Ok(Self {
            base,
            host,
            instance,
        })
    }

    /// The base URL (always ends with `/`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The instance, when the endpoint is one of Braze's.
    pub fn instance(&self) -> Option<Instance> {
        self.instance
    }

    /// `POST /users/track` on this endpoint.
    pub fn track_url(&self) -> String {
        format!("{}users/track", self.base)
    }

    /// `host[:port]`, for messages and logs.
    pub fn host(&self) -> &str {
        &self.host
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let base = self.base.trim_end_matches('/');
        match self.instance {
            Some(i) => write!(f, "{base} ({i})"),
            None => f.write_str(base),
        }
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Endpoint::parse(s)
    }
}

/// `localhost`, 127.0.0.0/8 or `::1` (IPv6 hosts arrive bracketed).
fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Removes `user:password@` from a URL-looking string before it goes into an error.
fn redact_userinfo(s: &str) -> String {
    match (s.find("://"), s.find('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &s[..scheme_end], &s[at + 1..])
        }
        _ => s.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_instance_maps_to_its_documented_rest_endpoint() {
        let cases = [
            ("US-01", "https://rest.iad-01.braze.com/users/track"),
            ("US-03", "https://rest.iad-03.braze.com/users/track"),
            ("US-08", "https://rest.iad-08.braze.com/users/track"),
            ("US-10", "https://rest.us-10.braze.com/users/track"),
            ("EU-01", "https://rest.fra-01.braze.eu/users/track"),
            ("EU-02", "https://rest.fra-02.braze.eu/users/track"),
            ("AU-01", "https://rest.au-01.braze.com/users/track"),
            ("ID-01", "https://rest.id-01.braze.com/users/track"),
            ("JP-01", "https://rest.jp-01.braze.com/users/track"),
            ("KR-01", "https://rest.kr-01.braze.com/users/track"),
        ];
        for (name, url) in cases {
            assert_eq!(Endpoint::parse(name).unwrap().track_url(), url);
        }
        for i in Instance::ALL {
            let e = Endpoint::for_instance(i);
            assert_eq!(e.instance(), Some(i));
            assert!(e.track_url().starts_with("https://rest."));
            assert_eq!(i.name().parse::<Instance>().unwrap(), i);
        }
    }

    #[test]
    fn instance_names_are_matched_loosely() {
        assert_eq!("us-03".parse::<Instance>().unwrap(), Instance::Us03);
        assert_eq!("US03".parse::<Instance>().unwrap(), Instance::Us03);
        assert_eq!(" eu_01 ".parse::<Instance>().unwrap(), Instance::Eu01);
    }

    #[test]
    fn us_09_does_not_exist() {
        assert!(matches!(
            Endpoint::parse("US-09"),
            Err(EndpointError::UnknownInstance { .. })
        ));
    }

    #[test]
    fn explicit_https_url_is_accepted_and_recognised() {
        let e = Endpoint::parse("https://rest.iad-03.braze.com").unwrap();
        assert_eq!(e.instance(), Some(Instance::Us03));
        let e = Endpoint::parse("https://braze.example.com/proxy").unwrap();
        assert_eq!(e.track_url(), "https://braze.example.com/proxy/users/track");
        assert_eq!(e.instance(), None);
    }

    #[test]
    fn plain_http_is_refused_unless_the_host_is_loopback() {
        for ok in [
            "http://127.0.0.1:4010",
            "http://127.8.9.10:1/",
            "http://[::1]:4010",
            "http://localhost:4010",
        ] {
            let e = Endpoint::parse(ok).unwrap();
            assert!(e.track_url().ends_with("/users/track"), "{ok}");
        }
        for bad in [
            "http://rest.iad-03.braze.com",
            "http://10.0.0.1",
            "http://localhost.evil.com",
            "ftp://127.0.0.1",
        ] {
            assert!(
                matches!(Endpoint::parse(bad), Err(EndpointError::Insecure { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn url_with_credentials_is_refused_without_echoing_them() {
        let err = Endpoint::parse("https://user:hunter2@rest.iad-01.braze.com").unwrap_err();
        assert!(matches!(err, EndpointError::NotABaseUrl { .. }));
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn garbage_url_is_a_typed_error() {
        assert!(matches!(
            Endpoint::parse("https://"),
            Err(EndpointError::InvalidUrl { .. })
        ));
    }
}
