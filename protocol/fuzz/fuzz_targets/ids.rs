//! Ids go into NATS subjects: whatever parses must be safe there.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchboard_protocol::{ChatId, UserId};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    for parsed in [
        UserId::parse(s).map(|u| u.to_string()),
        ChatId::parse(s).map(|c| c.to_string()),
    ] {
        if let Ok(id) = parsed {
            assert!(!id.is_empty() && id.len() <= switchboard_protocol::MAX_ID_LEN);
            assert!(
                !id.chars()
                    .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control()),
                "subject-unsafe id accepted: {id:?}"
            );
        }
    }
});
