//! Operators: the principals who publish, stage and read the fleet over
//! the peer protocol, as distinct from targets.
//!
//! An operator key is an ed25519 key (`convoy keygen`). Each CLI run is a
//! session with a fresh libp2p identity; the operator key signs that
//! identity and the coordinator's ([`crate::protocol::operator_proof_bytes`]),
//! and the coordinator checks the key's id (its fingerprint) against its
//! allow-list before it acts on the session's operator requests. Targets hold
//! the fleet key, which only admits a peer to the fleet; the fleet key alone
//! lets no one publish, upload, stage or list the fleet.
//!
//! The allow-list (`operators` file) has one operator a line, `NAME PEER_ID`;
//! blank lines and `#` comments are skipped.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};
use libp2p::identity::Keypair;
use libp2p::PeerId;

/// Operators a coordinator accepts, at most.
pub const MAX_OPERATORS: usize = 1024;
/// An operator's name: letters, digits, '-', '_', '.', '@', at most this long.
const MAX_NAME_BYTES: usize = 64;

/// The operators a coordinator accepts, by peer id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operators {
    by_peer: BTreeMap<PeerId, String>,
}

impl Operators {
    /// Parses an allow-list: `NAME PEER_ID` a line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut by_peer = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, id] = fields[..] else {
                return Err(format!(
                    "line {}: expected NAME PEER_ID (as `convoy keygen` prints), found {line:?}",
                    n + 1
                ));
            };
            let name_ok = name.len() <= MAX_NAME_BYTES
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
            if !name_ok {
                return Err(format!(
                    "line {}: operator name {name:?} is not 1-{MAX_NAME_BYTES} of letters, digits, '-', '_', '.', '@'",
                    n + 1
                ));
            }
            let peer: PeerId = id
                .parse()
                .map_err(|e| format!("line {}: {id:?} is not an operator id: {e}", n + 1))?;
            if by_peer.insert(peer, name.to_string()).is_some() {
                return Err(format!("line {}: operator id {id} is listed twice", n + 1));
            }
            if by_peer.len() > MAX_OPERATORS {
                return Err(format!("more than {MAX_OPERATORS} operators"));
            }
        }
        Ok(Self { by_peer })
    }

    /// Reads the allow-list at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the operators file {}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The allow-list at `list`; if there is none, a new operator key at
    /// `key` (kept if it exists) and a list naming it `local`. This is how a
    /// coordinator starts with an operator on its own host, as it starts
    /// with an API token.
    pub fn read_or_create(list: &Path, key: &Path) -> Result<Self> {
        if list.exists() {
            return Self::read(list);
        }
        let peer = if key.exists() {
            read_key(key)?.public().to_peer_id()
        } else {
            generate_key(key)?
        };
        let text = format!(
            "# Operators this coordinator accepts: NAME PEER_ID (`convoy keygen` prints it).\nlocal {peer}\n"
        );
        crate::durable::write_atomically(list, text.as_bytes())
            .with_context(|| format!("cannot write {}", list.display()))?;
        Self::parse(&text).map_err(anyhow::Error::msg)
    }

    /// The name `peer` is listed under, if it is an operator.
    pub fn name(&self, peer: &PeerId) -> Option<&str> {
        self.by_peer.get(peer).map(String::as_str)
    }

    /// How many operators are listed.
    pub fn len(&self) -> usize {
        self.by_peer.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.by_peer.is_empty()
    }
}

/// Writes a new operator key (the ed25519 secret, 64 hex digits) to
/// `path`, readable by its owner only from the moment it exists, and
/// returns the operator id it proves.
pub fn generate_key(path: &Path) -> Result<PeerId> {
    let key = libp2p::identity::ed25519::Keypair::generate();
    let text = format!("{}\n", hex::encode(key.secret().as_ref()));
    match crate::durable::create_private(path, text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!(
                "{} exists; an operator key is never overwritten",
                path.display()
            )
        }
        other => other.with_context(|| format!("cannot create {}", path.display()))?,
    }
    Ok(Keypair::from(key).public().to_peer_id())
}

/// Reads an operator key written by [`generate_key`].
pub fn read_key(path: &Path) -> Result<Keypair> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read operator key {}", path.display()))?;
    let not_a_key = || {
        format!(
            "{} is not an operator key (64 hex digits); make one with `convoy keygen FILE`",
            path.display()
        )
    };
    let mut bytes = hex::decode(text.trim()).ok().with_context(not_a_key)?;
    if bytes.len() != 32 {
        bail!(not_a_key());
    }
    Keypair::ed25519_from_bytes(&mut bytes).with_context(not_a_key)
}

/// Refused attempts, counted by what was refused, for `/metrics`.
#[derive(Debug, Default)]
pub struct Refusals {
    /// Operator requests (publish, upload, missing-chunks, stage, staging
    /// status, fleet listing) from a peer that is not an operator.
    pub not_operator: AtomicU64,
    /// API requests without the right bearer token.
    pub bad_token: AtomicU64,
}

impl Refusals {
    /// Counts one.
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_reads_back_private_and_is_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("operator.key");
        let id = generate_key(&path).unwrap();
        assert_eq!(read_key(&path).unwrap().public().to_peer_id(), id);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = format!("{:#}", generate_key(&path).unwrap_err());
        assert!(e.ends_with("an operator key is never overwritten"), "{e}");
        assert_eq!(read_key(&path).unwrap().public().to_peer_id(), id);
    }

    #[test]
    fn a_fleet_key_is_not_an_operator_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "abcd\n").unwrap();
        let e = format!("{:#}", read_key(&path).unwrap_err());
        assert!(e.contains("not an operator key"), "{e}");
    }

    #[test]
    fn the_allow_list_names_operators_and_refuses_bad_lines() {
        let a = Keypair::generate_ed25519().public().to_peer_id();
        let b = Keypair::generate_ed25519().public().to_peer_id();
        let ops = Operators::parse(&format!("# who\nalice {a}\n\nbob@ci {b}  # the CI\n")).unwrap();
        assert_eq!(ops.name(&a), Some("alice"));
        assert_eq!(ops.name(&b), Some("bob@ci"));
        assert_eq!(ops.len(), 2);
        let stranger = Keypair::generate_ed25519().public().to_peer_id();
        assert_eq!(ops.name(&stranger), None);

        for (text, says) in [
            (format!("{a}\n"), "expected NAME PEER_ID"),
            ("alice notapeer\n".to_string(), "not an operator id"),
            (format!("al ice {a}\n"), "expected NAME PEER_ID"),
            (format!("a/b {a}\n"), "operator name"),
            (format!("x {a}\ny {a}\n"), "listed twice"),
        ] {
            let e = Operators::parse(&text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_missing_list_is_made_with_a_local_operator_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (list, key) = (
            dir.path().join("operators"),
            dir.path().join("operator.key"),
        );
        let ops = Operators::read_or_create(&list, &key).unwrap();
        let id = read_key(&key).unwrap().public().to_peer_id();
        assert_eq!(ops.name(&id), Some("local"));
        // A second start reads the same list and key.
        assert_eq!(Operators::read_or_create(&list, &key).unwrap(), ops);
        assert_eq!(read_key(&key).unwrap().public().to_peer_id(), id);
    }
}
