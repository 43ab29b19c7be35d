//! The fleet key: 32 random bytes every member holds, kept as 64 hex digits.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Reads a fleet key file (64 hex digits, surrounding whitespace ignored).
pub fn read(path: &Path) -> Result<[u8; 32]> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read fleet key {}", path.display()))?;
    let bytes = hex::decode(text.trim())
        .ok()
        .filter(|b| b.len() == 32)
        .with_context(|| {
            format!(
                "{} is not a fleet key (64 hex digits); make one with `convoyd fleet-key FILE`",
                path.display()
            )
        })?;
    Ok(bytes.try_into().expect("32 bytes"))
}

/// Writes a new random key to `path`, readable by its owner only.
pub fn generate(path: &Path) -> Result<()> {
    let mut key = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
    let text = format!("{}\n", hex::encode(key));
    match crate::durable::create_private(path, text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!(
                "{} exists; a fleet key is never overwritten",
                path.display()
            )
        }
        other => other.with_context(|| format!("cannot create {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_reads_back_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        generate(&p).unwrap();
        let k = read(&p).unwrap();
        assert_ne!(k, [0; 32]);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(generate(&p).is_err(), "overwrote a key");
    }

    #[test]
    fn a_short_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "abcd\n").unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("not a fleet key"), "{e}");
    }
}
