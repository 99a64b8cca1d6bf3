//! Messages to the thin-pool target (spec §3.10), parsed as kernel 6.1 does.
//!
//! A message travels through DM core first (`target_message` in dm-ioctl.c):
//! the text is split like table parameters ([`split_args`]: kernel white
//! space including byte 0xA0, backslash quoting, end at NUL), an empty message
//! is refused there, and a first word starting with `@` is a DM core message
//! that never reaches the pool. Then `pool_message` refuses everything when
//! the pool is in OUT_OF_METADATA_SPACE, READ_ONLY or FAIL mode — before it
//! even looks at the verb — and otherwise dispatches on the verb
//! (ASCII case-insensitive). Argument counts include the verb and are exact;
//! ids are read with `kstrtoull` in base 10 ([`kstrtoull`]: optional `+`,
//! digits, one optional trailing newline; no spaces, no `0x`, no `-`).

use std::fmt;

use thiserror::Error;

use crate::errno::Errno;
use crate::thin::metadata::ThinId;
use crate::thin::mode::PoolMode;
use crate::thin::table::{kstrtoull, split_args};

/// The largest thin device id (2^24 − 1); larger ids are refused by the
/// message parser and by the thin table.
pub const MAX_DEV_ID: ThinId = (1 << 24) - 1;

/// The DM core messages (handled before the target is asked; never seen by
/// the pool). The model does not implement them.
const DM_CORE_MESSAGES: [&str; 8] = [
    "@cancel_deferred_remove",
    "@stats_create",
    "@stats_delete",
    "@stats_clear",
    "@stats_list",
    "@stats_print",
    "@stats_print_clear",
    "@stats_set_aux",
];

/// A parsed pool message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolMessage {
    /// `create_thin <dev id>`.
    CreateThin(ThinId),
    /// `create_snap <dev id> <origin id>`.
    CreateSnap {
        /// The new snapshot's id.
        id: ThinId,
        /// The device it is a snapshot of.
        origin: ThinId,
    },
    /// `delete <dev id>`.
    Delete(ThinId),
    /// `set_transaction_id <current> <new>` (any `u64`, no id limit).
    SetTransactionId {
        /// The transaction id the pool must currently have.
        current: u64,
        /// The transaction id to set.
        new: u64,
    },
    /// `reserve_metadata_snap` (the kernel commits first).
    ReserveMetadataSnap,
    /// `release_metadata_snap`.
    ReleaseMetadataSnap,
}

/// Why a message was refused: the errno the message ioctl returns and the
/// text the kernel logs (DMWARN/DMERR, without the device-name prefix).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message} ({errno})")]
pub struct MessageError {
    /// What the message ioctl returns (negated in the kernel).
    pub errno: Errno,
    /// The kernel's log text.
    pub message: String,
}

impl MessageError {
    fn einval(message: impl Into<String>) -> Self {
        MessageError { errno: Errno::EINVAL, message: message.into() }
    }
}

/// An argument as the kernel would print it with `%s`.
fn show(arg: &[u8]) -> String {
    String::from_utf8_lossy(arg).into_owned()
}

/// `check_arg_count`: `argc` counts the verb.
fn check_arg_count(args: &[Vec<u8>], required: usize) -> Result<(), MessageError> {
    if args.len() == required {
        Ok(())
    } else {
        Err(MessageError::einval(format!(
            "Message received with {} arguments instead of {}.",
            args.len(),
            required
        )))
    }
}

/// `read_dev_id` with its warning.
fn read_dev_id(arg: &[u8]) -> Result<ThinId, MessageError> {
    kstrtoull(arg).filter(|&id| id <= MAX_DEV_ID).ok_or_else(|| {
        MessageError::einval(format!("Message received with invalid device id: {}", show(arg)))
    })
}

/// The DM core stage: splitting, the empty message, `@` messages.
fn split_for_target(text: &str) -> Result<Vec<Vec<u8>>, MessageError> {
    let args = split_args(text);
    let Some(verb) = args.first() else {
        return Err(MessageError::einval("Empty message received."));
    };
    if verb.first() == Some(&b'@') {
        if DM_CORE_MESSAGES.iter().any(|m| verb.eq_ignore_ascii_case(m.as_bytes())) {
            if verb.eq_ignore_ascii_case(b"@cancel_deferred_remove") && args.len() != 1 {
                return Err(MessageError::einval("Invalid arguments for @cancel_deferred_remove"));
            }
            return Err(MessageError {
                errno: Errno::EOPNOTSUPP,
                message: format!("DM core message, not modelled (it never reaches the pool): {}", show(verb)),
            });
        }
        return Err(MessageError::einval(format!("Unsupported message sent to DM core: {}", show(verb))));
    }
    Ok(args)
}

impl PoolMessage {
    /// Parses a message as DM core and `pool_message` would for a pool in a
    /// mode that accepts messages (WRITE or OUT_OF_DATA_SPACE). Errors, all
    /// EINVAL, in the kernel's order:
    ///
    /// * no words: `Empty message received.` (DM core);
    /// * first word starts with `@`: a DM core message. Unknown ones give
    ///   `Unsupported message sent to DM core: <verb>`; `@cancel_deferred_remove`
    ///   with arguments gives `Invalid arguments for @cancel_deferred_remove`;
    ///   the real DM core messages (`@cancel_deferred_remove`, `@stats_*`) are
    ///   not modelled and give EOPNOTSUPP with a text saying so (not a kernel
    ///   text);
    /// * unknown verb: `Unrecognised thin pool target message received: <verb>`;
    /// * wrong count: `Message received with <n> arguments instead of <m>.`
    ///   (both counts include the verb);
    /// * bad or too large id: `Message received with invalid device id: <arg>`
    ///   (for `create_snap` the new id is checked before the origin);
    /// * bad transaction id: `set_transaction_id message: Unrecognised id
    ///   <arg>.` or `... Unrecognised new id <arg>.`.
    pub fn parse(text: &str) -> Result<Self, MessageError> {
        let args = split_for_target(text)?;
        Self::parse_target_args(&args)
    }

    /// Like [`PoolMessage::parse`] for a pool in `mode`: after DM core's checks
    /// and before looking at the verb, a pool in OUT_OF_METADATA_SPACE,
    /// READ_ONLY or FAIL mode refuses every message, well-formed or not, with
    /// EOPNOTSUPP (`unable to service pool target messages in READ_ONLY or
    /// FAIL mode`).
    pub fn parse_in_mode(text: &str, mode: PoolMode) -> Result<Self, MessageError> {
        let args = split_for_target(text)?;
        if mode >= PoolMode::OutOfMetadataSpace {
            return Err(MessageError {
                errno: Errno::EOPNOTSUPP,
                message: "unable to service pool target messages in READ_ONLY or FAIL mode".to_string(),
            });
        }
        Self::parse_target_args(&args)
    }

    /// `pool_message`'s dispatch on already split, non-empty arguments.
    fn parse_target_args(args: &[Vec<u8>]) -> Result<Self, MessageError> {
        let verb = args[0].as_slice();
        let is = |name: &str| verb.eq_ignore_ascii_case(name.as_bytes());
        if is("create_thin") {
            check_arg_count(args, 2)?;
            Ok(PoolMessage::CreateThin(read_dev_id(&args[1])?))
        } else if is("create_snap") {
            check_arg_count(args, 3)?;
            let id = read_dev_id(&args[1])?;
            let origin = read_dev_id(&args[2])?;
            Ok(PoolMessage::CreateSnap { id, origin })
        } else if is("delete") {
            check_arg_count(args, 2)?;
            Ok(PoolMessage::Delete(read_dev_id(&args[1])?))
        } else if is("set_transaction_id") {
            check_arg_count(args, 3)?;
            let current = kstrtoull(&args[1]).ok_or_else(|| {
                MessageError::einval(format!(
                    "set_transaction_id message: Unrecognised id {}.",
                    show(&args[1])
                ))
            })?;
            let new = kstrtoull(&args[2]).ok_or_else(|| {
                MessageError::einval(format!(
                    "set_transaction_id message: Unrecognised new id {}.",
                    show(&args[2])
                ))
            })?;
            Ok(PoolMessage::SetTransactionId { current, new })
        } else if is("reserve_metadata_snap") {
            check_arg_count(args, 1)?;
            Ok(PoolMessage::ReserveMetadataSnap)
        } else if is("release_metadata_snap") {
            check_arg_count(args, 1)?;
            Ok(PoolMessage::ReleaseMetadataSnap)
        } else {
            Err(MessageError::einval(format!(
                "Unrecognised thin pool target message received: {}",
                show(verb)
            )))
        }
    }

    /// The message's verb in canonical (lower) case.
    pub fn verb(&self) -> &'static str {
        match self {
            PoolMessage::CreateThin(_) => "create_thin",
            PoolMessage::CreateSnap { .. } => "create_snap",
            PoolMessage::Delete(_) => "delete",
            PoolMessage::SetTransactionId { .. } => "set_transaction_id",
            PoolMessage::ReserveMetadataSnap => "reserve_metadata_snap",
            PoolMessage::ReleaseMetadataSnap => "release_metadata_snap",
        }
    }

    /// The warning the kernel logs when the metadata operation behind a
    /// well-formed message fails (the errno is the operation's). The kernel
    /// prints the arguments as the user wrote them (`+5` stays `+5`); this
    /// prints them canonically.
    pub fn failure_warning(&self) -> String {
        match *self {
            PoolMessage::CreateThin(id) => {
                format!("Creation of new thinly-provisioned device with id {id} failed.")
            }
            PoolMessage::CreateSnap { id, origin } => {
                format!("Creation of new snapshot {id} of device {origin} failed.")
            }
            PoolMessage::Delete(id) => format!("Deletion of thin device {id} failed."),
            PoolMessage::SetTransactionId { current, new } => {
                format!("Failed to change transaction id from {current} to {new}.")
            }
            PoolMessage::ReserveMetadataSnap => "reserve_metadata_snap message failed.".to_string(),
            PoolMessage::ReleaseMetadataSnap => "release_metadata_snap message failed.".to_string(),
        }
    }
}

/// The canonical message text: the lower-case verb and decimal arguments,
/// separated by single spaces.
impl fmt::Display for PoolMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.verb())?;
        match *self {
            PoolMessage::CreateThin(id) | PoolMessage::Delete(id) => write!(f, " {id}"),
            PoolMessage::CreateSnap { id, origin } => write!(f, " {id} {origin}"),
            PoolMessage::SetTransactionId { current, new } => write!(f, " {current} {new}"),
            PoolMessage::ReserveMetadataSnap | PoolMessage::ReleaseMetadataSnap => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err(text: &str) -> MessageError {
        PoolMessage::parse(text).unwrap_err()
    }

    fn einval(message: &str) -> MessageError {
        MessageError { errno: Errno::EINVAL, message: message.to_string() }
    }

    #[test]
    fn parses_every_verb() {
        assert_eq!(PoolMessage::parse("create_thin 0"), Ok(PoolMessage::CreateThin(0)));
        assert_eq!(
            PoolMessage::parse("create_snap 16777215 1"),
            Ok(PoolMessage::CreateSnap { id: MAX_DEV_ID, origin: 1 })
        );
        assert_eq!(PoolMessage::parse("delete 7"), Ok(PoolMessage::Delete(7)));
        assert_eq!(
            PoolMessage::parse("set_transaction_id 18446744073709551615 0"),
            Ok(PoolMessage::SetTransactionId { current: u64::MAX, new: 0 })
        );
        assert_eq!(PoolMessage::parse("reserve_metadata_snap"), Ok(PoolMessage::ReserveMetadataSnap));
        assert_eq!(PoolMessage::parse("release_metadata_snap"), Ok(PoolMessage::ReleaseMetadataSnap));
    }

    #[test]
    fn verbs_are_case_insensitive_and_splitting_is_dm_style() {
        assert_eq!(PoolMessage::parse("CREATE_Thin 5"), Ok(PoolMessage::CreateThin(5)));
        assert_eq!(PoolMessage::parse("  Delete\t\t5\n"), Ok(PoolMessage::Delete(5)));
        assert_eq!(PoolMessage::parse("Reserve_Metadata_Snap"), Ok(PoolMessage::ReserveMetadataSnap));
        // A backslash quotes the next byte; an escaped newline is the one
        // trailing newline kstrtoull accepts.
        assert_eq!(PoolMessage::parse("create_thin 5\\\n"), Ok(PoolMessage::CreateThin(5)));
        assert_eq!(PoolMessage::parse("cre\\ate_thin 5"), Ok(PoolMessage::CreateThin(5)));
        // The string ends at NUL.
        assert_eq!(PoolMessage::parse("delete 5\0 6"), Ok(PoolMessage::Delete(5)));
    }

    #[test]
    fn id_syntax_follows_kstrtoull() {
        assert_eq!(PoolMessage::parse("create_thin +5"), Ok(PoolMessage::CreateThin(5)));
        assert_eq!(PoolMessage::parse("create_thin 0005"), Ok(PoolMessage::CreateThin(5)));
        for bad in ["0x10", "-1", "+", "++5", "5a", "16777216", "18446744073709551616", "\\ 5", "5\\ "] {
            assert_eq!(
                err(&format!("create_thin {bad}")),
                einval(&format!("Message received with invalid device id: {}", bad.replace('\\', ""))),
                "{bad}"
            );
        }
        assert_eq!(
            err("set_transaction_id 0x1 2"),
            einval("set_transaction_id message: Unrecognised id 0x1.")
        );
        assert_eq!(
            err("set_transaction_id 1 18446744073709551616"),
            einval("set_transaction_id message: Unrecognised new id 18446744073709551616.")
        );
        // Transaction ids have no 2^24 limit.
        assert_eq!(
            PoolMessage::parse("set_transaction_id +16777216 5\\\n"),
            Ok(PoolMessage::SetTransactionId { current: 1 << 24, new: 5 })
        );
    }

    #[test]
    fn error_paths() {
        assert_eq!(err(""), einval("Empty message received."));
        assert_eq!(err(" \t\n"), einval("Empty message received."));
        assert_eq!(err("\0create_thin 1"), einval("Empty message received."));
        assert_eq!(err("create"), einval("Unrecognised thin pool target message received: create"));
        assert_eq!(err("frob 1 2"), einval("Unrecognised thin pool target message received: frob"));
        assert_eq!(err("create_thin"), einval("Message received with 1 arguments instead of 2."));
        assert_eq!(err("create_thin 1 2"), einval("Message received with 3 arguments instead of 2."));
        assert_eq!(err("create_snap 1"), einval("Message received with 2 arguments instead of 3."));
        assert_eq!(err("delete"), einval("Message received with 1 arguments instead of 2."));
        assert_eq!(err("set_transaction_id 1"), einval("Message received with 2 arguments instead of 3."));
        assert_eq!(err("reserve_metadata_snap 1"), einval("Message received with 2 arguments instead of 1."));
        assert_eq!(
            err("release_metadata_snap x y"),
            einval("Message received with 3 arguments instead of 1.")
        );
        // Count before ids; new id before origin.
        assert_eq!(err("create_thin x y"), einval("Message received with 3 arguments instead of 2."));
        assert_eq!(err("create_snap x y"), einval("Message received with invalid device id: x"));
        assert_eq!(err("create_snap 1 y"), einval("Message received with invalid device id: y"));
        assert_eq!(err("set_transaction_id x y"), einval("set_transaction_id message: Unrecognised id x."));
        assert_eq!(err("delete x").to_string(), "Message received with invalid device id: x (EINVAL)");
    }

    #[test]
    fn dm_core_messages() {
        assert_eq!(err("@frob"), einval("Unsupported message sent to DM core: @frob"));
        assert_eq!(
            err("@cancel_deferred_remove now"),
            einval("Invalid arguments for @cancel_deferred_remove")
        );
        assert_eq!(err("@Stats_List").errno, Errno::EOPNOTSUPP);
        assert_eq!(err("@cancel_deferred_remove").errno, Errno::EOPNOTSUPP);
        // Only a leading '@' goes to DM core.
        assert_eq!(err("x@"), einval("Unrecognised thin pool target message received: x@"));
    }

    #[test]
    fn mode_check_comes_before_the_verb() {
        let refused = MessageError {
            errno: Errno::EOPNOTSUPP,
            message: "unable to service pool target messages in READ_ONLY or FAIL mode".to_string(),
        };
        for mode in [PoolMode::OutOfMetadataSpace, PoolMode::ReadOnly, PoolMode::Fail] {
            assert_eq!(PoolMessage::parse_in_mode("create_thin 1", mode), Err(refused.clone()));
            assert_eq!(PoolMessage::parse_in_mode("nonsense", mode), Err(refused.clone()));
            // DM core's checks come first.
            assert_eq!(PoolMessage::parse_in_mode("", mode), Err(einval("Empty message received.")));
            assert_eq!(
                PoolMessage::parse_in_mode("@x", mode),
                Err(einval("Unsupported message sent to DM core: @x"))
            );
        }
        for mode in [PoolMode::Write, PoolMode::OutOfDataSpace] {
            assert_eq!(PoolMessage::parse_in_mode("delete 1", mode), Ok(PoolMessage::Delete(1)));
            assert_eq!(PoolMessage::parse_in_mode("delete", mode), Err(err("delete")));
        }
    }

    #[test]
    fn display_and_warnings() {
        let all = [
            (
                PoolMessage::CreateThin(1),
                "create_thin 1",
                "Creation of new thinly-provisioned device with id 1 failed.",
            ),
            (
                PoolMessage::CreateSnap { id: 2, origin: 1 },
                "create_snap 2 1",
                "Creation of new snapshot 2 of device 1 failed.",
            ),
            (PoolMessage::Delete(3), "delete 3", "Deletion of thin device 3 failed."),
            (
                PoolMessage::SetTransactionId { current: 4, new: 5 },
                "set_transaction_id 4 5",
                "Failed to change transaction id from 4 to 5.",
            ),
            (
                PoolMessage::ReserveMetadataSnap,
                "reserve_metadata_snap",
                "reserve_metadata_snap message failed.",
            ),
            (
                PoolMessage::ReleaseMetadataSnap,
                "release_metadata_snap",
                "release_metadata_snap message failed.",
            ),
        ];
        for (msg, text, warning) in all {
            assert_eq!(msg.to_string(), text);
            assert_eq!(msg.failure_warning(), warning);
            assert_eq!(PoolMessage::parse(text), Ok(msg));
        }
    }

    fn message_strategy() -> impl Strategy<Value = PoolMessage> {
        prop_oneof![
            (0..=MAX_DEV_ID).prop_map(PoolMessage::CreateThin),
            (0..=MAX_DEV_ID, 0..=MAX_DEV_ID).prop_map(|(id, origin)| PoolMessage::CreateSnap { id, origin }),
            (0..=MAX_DEV_ID).prop_map(PoolMessage::Delete),
            (any::<u64>(), any::<u64>())
                .prop_map(|(current, new)| PoolMessage::SetTransactionId { current, new }),
            Just(PoolMessage::ReserveMetadataSnap),
            Just(PoolMessage::ReleaseMetadataSnap),
        ]
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in "\\PC*") {
            let _ = PoolMessage::parse(&text);
            let _ = PoolMessage::parse_in_mode(&text, PoolMode::ReadOnly);
        }

        #[test]
        fn token_soup_never_panics(
            tokens in proptest::collection::vec(
                prop_oneof![
                    Just("create_thin".to_string()),
                    Just("create_snap".to_string()),
                    Just("set_transaction_id".to_string()),
                    "[+]?[0-9]{1,22}",
                    "[a-z@\\\\]{0,4}",
                ],
                0..5,
            )
        ) {
            let _ = PoolMessage::parse(&tokens.join(" "));
        }

        #[test]
        fn display_round_trips(msg in message_strategy(), upper in any::<bool>()) {
            let text = msg.to_string();
            let text = if upper { text.to_uppercase() } else { text };
            prop_assert_eq!(PoolMessage::parse(&text), Ok(msg));
        }
    }
}
