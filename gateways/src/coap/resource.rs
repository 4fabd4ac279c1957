//! The CoAP adapter's resources and request options, as Hono's CoAP adapter guide names them, read from a
//! decoded packet: pure functions, no I/O.

use crate::pipeline::{Endpoint, Refusal};
use coap_lite::{CoapOption, MessageClass, Packet, RequestType};

/// Hono's experimental option asking for the server time (Hono's CoAP adapter guide).
pub const HONO_TIME_OPTION: u16 = 0xFDE8;

/// What a request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// `/telemetry`, `/t`, `/event`, `/e` and their `{tenant}/{device}` forms.
    Upload {
        endpoint: Endpoint,
        /// Tenant (maybe empty: the gateway's own) and device named in the path.
        target: Option<(String, String)>,
    },
    /// `/command_response/{reqId}`, `/cr/{reqId}` and their `{tenant}/{device}/{reqId}` forms.
    CommandResponse {
        target: Option<(String, String)>,
        request_id: String,
    },
}

/// A request the adapter understood, with Hono's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub resource: Resource,
    /// Whether the path used the short names (`t`, `e`, `cr`): command locations mirror it.
    pub short: bool,
    /// `hono-ttd` in seconds.
    pub ttd: Option<i64>,
    /// `hono-ttl` in seconds.
    pub ttl: Option<i64>,
    /// `empty`: an empty notification.
    pub empty: bool,
    /// `hono-time` (query or option 0xFDE8): the response carries the server time.
    pub time: bool,
    /// `piggy`: the device asks for its own ACK timeout (`deviceTriggeredTimeoutToAck`).
    pub piggy: bool,
    /// `hono-cmd-status` of a command response.
    pub status: Option<u16>,
    /// The media type of the payload, from the Content-Format option.
    pub content_type: Option<String>,
    /// The path as sent, for the `orig_address` header.
    pub path: String,
}

/// Why a request was not understood. `NotFound` (4.04) and `MethodNotAllowed` (4.05) are about
/// the resource, before any device is known; `Refused` carries the pipeline's reason table
/// entry (4.00 for a malformed option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceError {
    NotFound,
    MethodNotAllowed,
    /// A critical option the adapter does not understand (4.02), by number.
    BadOption(u16),
    Refused(Refusal),
}

/// Reads the resource and options of a request packet.
pub fn parse(packet: &Packet) -> Result<Request, ResourceError> {
    let method = match packet.header.code {
        MessageClass::Request(m) => m,
        _ => return Err(ResourceError::NotFound),
    };
    // An option the adapter does not know whose number says it must be understood (odd
    // numbers are critical, RFC 7252 §5.4.1): 4.02.
    if let Some(number) = packet
        .options()
        .find_map(|(n, _)| match CoapOption::from(*n) {
            CoapOption::Unknown(n) if n % 2 == 1 => Some(n),
            CoapOption::ProxyUri | CoapOption::ProxyScheme => Some(*n),
            _ => None,
        })
    {
        return Err(ResourceError::BadOption(number));
    }
    let segments: Vec<String> = packet
        .get_option(CoapOption::UriPath)
        .into_iter()
        .flatten()
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    let path = format!("/{}", segments.join("/"));
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let (resource, short, put) = match segs.as_slice() {
        [e @ ("telemetry" | "t" | "event" | "e")] => (upload(e, None), e.len() == 1, false),
        [e @ ("telemetry" | "t" | "event" | "e"), tenant, device] if !device.is_empty() => {
            let target = Some(((*tenant).to_owned(), (*device).to_owned()));
            (upload(e, target), e.len() == 1, true)
        }
        [r @ ("command_response" | "cr"), req] if !req.is_empty() => (
            Resource::CommandResponse {
                target: None,
                request_id: (*req).to_owned(),
            },
            *r == "cr",
            false,
        ),
        [r @ ("command_response" | "cr"), tenant, device, req]
            if !device.is_empty() && !req.is_empty() =>
        {
            (
                Resource::CommandResponse {
                    target: Some(((*tenant).to_owned(), (*device).to_owned())),
                    request_id: (*req).to_owned(),
                },
                *r == "cr",
                true,
            )
        }
        _ => return Err(ResourceError::NotFound),
    };
    // Hono: POST to a resource without a path beyond the endpoint, PUT with tenant and device.
    match (method, put) {
        (RequestType::Post, false) | (RequestType::Put, true) => {}
        _ => return Err(ResourceError::MethodNotAllowed),
    }
    let mut request = Request {
        resource,
        short,
        ttd: None,
        ttl: None,
        empty: false,
        time: packet
            .get_option(CoapOption::Unknown(HONO_TIME_OPTION))
            .is_some(),
        piggy: false,
        status: None,
        content_type: None,
        path,
    };
    for q in packet
        .get_option(CoapOption::UriQuery)
        .into_iter()
        .flatten()
    {
        let q = std::str::from_utf8(q)
            .map_err(|_| refused("a query parameter is not UTF-8".to_owned()))?;
        let (name, value) = q.split_once('=').unwrap_or((q, ""));
        match name {
            "hono-ttd" => request.ttd = Some(number(name, value)?),
            "hono-ttl" => request.ttl = Some(number(name, value)?),
            "hono-cmd-status" => {
                let status = number(name, value)?;
                request.status = Some(
                    u16::try_from(status)
                        .map_err(|_| refused(format!("invalid status {status}")))?,
                );
            }
            "empty" => request.empty = true,
            "hono-time" => request.time = true,
            "piggy" => request.piggy = true,
            _ => {}
        }
    }
    if let Some(cf) = packet.get_first_option(CoapOption::ContentFormat) {
        let code = option_uint(cf).ok_or_else(|| refused("invalid Content-Format".to_owned()))?;
        request.content_type = Some(media_type(code));
    }
    if matches!(request.resource, Resource::CommandResponse { .. }) && request.status.is_none() {
        return Err(refused("`hono-cmd-status` is required".to_owned()));
    }
    Ok(request)
}

fn upload(endpoint: &str, target: Option<(String, String)>) -> Resource {
    let endpoint = match endpoint {
        "telemetry" | "t" => Endpoint::Telemetry,
        _ => Endpoint::Event,
    };
    Resource::Upload { endpoint, target }
}

fn refused(detail: String) -> ResourceError {
    ResourceError::Refused(Refusal::malformed(detail))
}

fn number(name: &str, value: &str) -> Result<i64, ResourceError> {
    value
        .parse()
        .map_err(|_| refused(format!("`{name}` must be an integer")))
}

/// A CoAP unsigned integer option value (RFC 7252 §3.2): big-endian, at most 4 bytes here.
pub fn option_uint(bytes: &[u8]) -> Option<u32> {
    if bytes.len() > 4 {
        return None;
    }
    Some(bytes.iter().fold(0, |n, b| (n << 8) | u32::from(*b)))
}

/// The same, encoded in the fewest bytes (0 is the empty value).
pub fn uint_option(n: u64) -> Vec<u8> {
    let bytes = n.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

/// CoAP Content-Formats and their media types (the IANA registry, RFC 7252 §12.3 and later
/// entries), both ways.
const CONTENT_FORMATS: &[(u32, &str)] = &[
    (0, "text/plain; charset=utf-8"),
    (40, "application/link-format"),
    (41, "application/xml"),
    (42, "application/octet-stream"),
    (47, "application/exi"),
    (50, "application/json"),
    (51, "application/json-patch+json"),
    (52, "application/merge-patch+json"),
    (60, "application/cbor"),
    (61, "application/cwt"),
    (110, "application/senml+json"),
    (112, "application/senml+cbor"),
];

/// The media type of a CoAP Content-Format. An unregistered number is kept as
/// `application/octet-stream`.
pub fn media_type(code: u32) -> String {
    CONTENT_FORMATS
        .iter()
        .find(|(c, _)| *c == code)
        .map_or(ferrule_schemas::content_type::OCTET_STREAM, |(_, t)| *t)
        .to_owned()
}

/// The Content-Format number of a media type, if it has one (commands sent to devices);
/// parameters such as `charset` are not compared.
pub fn content_format(media_type: &str) -> Option<u32> {
    let base = |t: &str| t.split(';').next().unwrap_or_default().trim().to_owned();
    let wanted = base(media_type);
    CONTENT_FORMATS
        .iter()
        .find(|(_, t)| base(t) == wanted)
        .map(|(c, _)| *c)
}
