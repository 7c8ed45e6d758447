//! The one format of the sidecar's small state files (`branch.meta`, a past server's
//! `past.conf`): text a person can read, whose damage is detected.
//!
//! ```text
//! name = value        one line per setting, in the writer's order
//! ...
//! crc = 1a2b3c4d      CRC32C of every byte before this line, 8 hex digits
//! ```
//!
//! Values are single lines (no newline inside); a reader takes the last `crc = ` line as the
//! end, so a value may not start a line with `crc = `.

use std::collections::HashMap;

/// The file's bytes for `settings`, in order.
pub fn encode(settings: &[(&str, String)]) -> Vec<u8> {
    let body: String = settings.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
    format!("{body}crc = {:08x}\n", crc32c::crc32c(body.as_bytes())).into_bytes()
}

/// The settings of a file's text, checked against its CRC; the error says what is wrong.
pub fn decode(text: &str) -> Result<Settings, String> {
    let (body, crc) = text.rsplit_once("crc = ").ok_or("no CRC line")?;
    if u32::from_str_radix(crc.trim(), 16).ok() != Some(crc32c::crc32c(body.as_bytes())) {
        return Err("CRC mismatch".into());
    }
    Ok(Settings(
        body.lines()
            .filter_map(|l| l.split_once(" = "))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
    ))
}

/// Settings read from a file.
pub struct Settings(HashMap<String, String>);

impl Settings {
    pub fn get(&self, name: &str) -> Result<&str, String> {
        self.0.get(name).map(String::as_str).ok_or_else(|| format!("no {name}"))
    }

    pub fn parse<T: std::str::FromStr>(&self, name: &str) -> Result<T, String> {
        self.get(name)?.parse().map_err(|_| format!("bad {name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_damage() {
        let bytes = encode(&[("id", "7".into()), ("path", "/a b/c".into())]);
        let text = String::from_utf8(bytes).unwrap();
        let s = decode(&text).unwrap();
        assert_eq!(s.parse::<u32>("id").unwrap(), 7);
        assert_eq!(s.get("path").unwrap(), "/a b/c");
        assert_eq!(s.get("lsn").unwrap_err(), "no lsn");
        assert_eq!(s.parse::<u32>("path").unwrap_err(), "bad path");
        assert_eq!(decode(&text.replace("id = 7", "id = 8")).err().unwrap(), "CRC mismatch");
        assert_eq!(decode("id = 7\n").err().unwrap(), "no CRC line");
    }
}
