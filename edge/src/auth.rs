//! Client token verification: JWT with an algorithm allowlist (HS256 with a
//! shared secret; RS256/ES256 with a public key), `exp`/`nbf`/`aud`/`iss`
//! checks. `alg: none` and every algorithm without a configured key are
//! refused.
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use switchboard_protocol::{ChatId, UserId, v1::ErrorCode};

/// The claims Switchboard reads from a client token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Expiry, unix seconds (required).
    pub exp: u64,
    /// Not before, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, unix seconds: a token issued before its user's
    /// revocation (or without `iat`) is refused while the revocation
    /// lasts (ADR 0039).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Chats this token grants outright (subscribe, publish, receipts,
    /// typing). Other chats are decided by `--chat-auth` (ADR 0031).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chats: Option<Vec<String>>,
    /// Set only in subscription tokens: a connection token carrying it is
    /// refused, so one kind cannot stand in for the other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<String>,
}

/// The claims of a subscription token: one user, one chat (ADR 0031).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscriptionClaims {
    /// User id: must be the socket's user.
    pub sub: String,
    /// The chat it grants.
    pub chat: String,
    /// Expiry, unix seconds (required).
    pub exp: u64,
    /// Not before, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Also lets the user publish and send typing in the chat; without it
    /// the token grants reading (subscribe) and receipts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub publish: bool,
}

/// A verified subscription token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatGrant {
    /// The user it was issued to.
    pub user: UserId,
    /// The chat it grants.
    pub chat: ChatId,
    /// Whether it grants publishing and typing too.
    pub publish: bool,
}

/// A verified token.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The user (`sub`).
    pub user: UserId,
    /// Expiry, unix ms.
    pub expires_at_ms: i64,
    /// Issue time (`iat`), unix ms; `None` without the claim.
    pub issued_at_ms: Option<i64>,
    /// Chats the token grants outright (`chats` claim); `None`: none, the
    /// chat authorization mode decides every chat.
    pub chats: Option<Arc<[ChatId]>>,
}

impl Identity {
    /// Whether the token's `chats` claim grants `chat`.
    pub fn grants(&self, chat: &ChatId) -> bool {
        self.chats.as_ref().is_some_and(|list| list.contains(chat))
    }

    /// Whether a revocation of tokens issued before `before_ms` covers
    /// this one: issued before it, or with no `iat` to tell (ADR 0039).
    pub fn revoked_by(&self, before_ms: i64) -> bool {
        self.issued_at_ms.is_none_or(|iat| iat < before_ms)
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in the Connect frame or the Authorization header.
    #[error("missing token")]
    Missing,
    /// Not a JWT, or a claim is malformed.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The token's algorithm is not allowed (including `none`).
    #[error("token algorithm not allowed")]
    Algorithm,
    /// The signature does not verify.
    #[error("bad token signature")]
    Signature,
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `aud` or `iss` does not match.
    #[error("token audience or issuer mismatch")]
    WrongAudienceOrIssuer,
    /// `sub` is not a valid user id.
    #[error("token subject: {0}")]
    Subject(String),
    /// A refresh token names another user.
    #[error("token is for another user")]
    OtherUser,
    /// The user's tokens issued before a time were revoked (kick with
    /// `revoke_secs`, ADR 0039); a token issued since is needed.
    #[error("token revoked")]
    Revoked,
    /// The edge has no key configured.
    #[error("no token key configured: set --jwt-secret or --jwt-public-key-file")]
    NoKey,
    /// The public key file is not an RSA or EC PEM key.
    #[error("public key: {0}")]
    BadKey(String),
}

impl AuthError {
    /// Protocol error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Expired | AuthError::NotYetValid => ErrorCode::TokenExpired,
            _ => ErrorCode::Unauthorized,
        }
    }

    /// Bounded metric label.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::Algorithm => "algorithm",
            AuthError::Signature => "signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::WrongAudienceOrIssuer => "audience_or_issuer",
            AuthError::Subject(_) => "subject",
            AuthError::OtherUser => "other_user",
            AuthError::Revoked => "revoked",
            AuthError::NoKey | AuthError::BadKey(_) => "config",
        }
    }
}

/// Token keys and checks.
#[derive(Clone)]
pub struct AuthConfig {
    hs256: Option<(DecodingKey, EncodingKey)>,
    public: Option<(Algorithm, DecodingKey)>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway_secs: u64,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("hs256", &self.hs256.is_some())
            .field("public", &self.public.as_ref().map(|(a, _)| *a))
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish()
    }
}

impl AuthConfig {
    /// Keys: an HS256 secret and/or a PEM public key (RSA → RS256, EC → ES256).
    pub fn new(
        secret: Option<Vec<u8>>,
        public_key_pem: Option<Vec<u8>>,
        audience: Option<String>,
        issuer: Option<String>,
        leeway_secs: u64,
    ) -> Result<AuthConfig, AuthError> {
        let hs256 = secret
            .filter(|s| !s.is_empty())
            .map(|s| (DecodingKey::from_secret(&s), EncodingKey::from_secret(&s)));
        let public = match public_key_pem {
            None => None,
            Some(pem) => Some(if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                (Algorithm::RS256, k)
            } else {
                let k = DecodingKey::from_ec_pem(&pem).map_err(|e| {
                    AuthError::BadKey(format!("not an RSA or EC PEM public key ({e})"))
                })?;
                (Algorithm::ES256, k)
            }),
        };
        if hs256.is_none() && public.is_none() {
            return Err(AuthError::NoKey);
        }
        Ok(AuthConfig {
            hs256,
            public,
            audience,
            issuer,
            leeway_secs,
        })
    }

    /// Verifies a connection token.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let claims: Claims = self.decode(token)?;
        if claims.chat.is_some() {
            return Err(AuthError::Malformed(
                "a subscription token (chat claim) is not a connection token".into(),
            ));
        }
        let user = UserId::parse(&claims.sub).map_err(|e| AuthError::Subject(e.to_string()))?;
        let chats = match claims.chats {
            None => None,
            Some(list) => Some(
                list.iter()
                    .map(|c| ChatId::parse(c))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| AuthError::Malformed(format!("chats claim: {e}")))?
                    .into(),
            ),
        };
        Ok(Identity {
            user,
            expires_at_ms: expires_ms(claims.exp)?,
            issued_at_ms: claims
                .iat
                .map(|s| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)),
            chats,
        })
    }

    /// Verifies a subscription token (same keys and checks as a connection
    /// token, plus a `chat` claim).
    pub fn verify_subscription(&self, token: &str) -> Result<ChatGrant, AuthError> {
        let claims: SubscriptionClaims = self.decode(token)?;
        expires_ms(claims.exp)?;
        let user = UserId::parse(&claims.sub).map_err(|e| AuthError::Subject(e.to_string()))?;
        let chat = ChatId::parse(&claims.chat)
            .map_err(|e| AuthError::Malformed(format!("chat claim: {e}")))?;
        Ok(ChatGrant {
            user,
            chat,
            publish: claims.publish,
        })
    }

    fn decode<C: serde::de::DeserializeOwned>(&self, token: &str) -> Result<C, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            // An unknown name, including "none", is an algorithm we refuse.
            ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
                AuthError::Algorithm
            }
            _ if token.split('.').next().is_some_and(header_says_none) => AuthError::Algorithm,
            _ => AuthError::Malformed(e.to_string()),
        })?;
        let key = match (header.alg, &self.hs256, &self.public) {
            (Algorithm::HS256, Some((k, _)), _) => k,
            (alg, _, Some((allowed, k))) if alg == *allowed => k,
            _ => return Err(AuthError::Algorithm),
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway_secs;
        validation.validate_nbf = true;
        // A configured aud/iss must also be present, not just match when present.
        let mut required = vec!["exp", "sub"];
        if self.audience.is_some() {
            required.push("aud");
        }
        if self.issuer.is_some() {
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        let data =
            jsonwebtoken::decode::<C>(token, key, &validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::Signature,
                ErrorKind::InvalidAlgorithm => AuthError::Algorithm,
                ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer => {
                    AuthError::WrongAudienceOrIssuer
                }
                ErrorKind::MissingRequiredClaim(c) if c == "aud" || c == "iss" => {
                    AuthError::WrongAudienceOrIssuer
                }
                _ => AuthError::Malformed(e.to_string()),
            })?;
        Ok(data.claims)
    }

    /// Mints an HS256 token (dev mode and tests). `None` without a secret.
    pub fn mint_hs256(&self, claims: &impl Serialize) -> Option<String> {
        let (_, key) = self.hs256.as_ref()?;
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, key).ok()
    }
}

/// Unix ms of `exp`; a token already past it is refused here with 440
/// (the leeway absorbs clock skew on nbf; a socket opened with an expired
/// token would only close at once with token_expired).
fn expires_ms(exp: u64) -> Result<i64, AuthError> {
    let at = (exp as i64).saturating_mul(1000);
    if at <= switchboard_protocol::now_ms() {
        return Err(AuthError::Expired);
    }
    Ok(at)
}

fn header_says_none(segment: &str) -> bool {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .ok()
        .and_then(|raw| serde_json::from_slice::<serde_json::Value>(&raw).ok())
        .and_then(|v| {
            v.get("alg")
                .and_then(|a| a.as_str())
                .map(|a| a.eq_ignore_ascii_case("none"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn a_revocation_covers_tokens_issued_before_it_or_without_iat() {
        let mut c = claims("mallory", now() + 60);
        let no_iat = cfg().verify(&cfg().mint_hs256(&c).unwrap()).unwrap();
        assert_eq!(no_iat.issued_at_ms, None);
        assert!(no_iat.revoked_by(0));
        c.iat = Some(1_000);
        let id = cfg().verify(&cfg().mint_hs256(&c).unwrap()).unwrap();
        assert_eq!(id.issued_at_ms, Some(1_000_000));
        assert!(id.revoked_by(1_000_001));
        assert!(!id.revoked_by(1_000_000), "issued at the mark: after it");
        assert_eq!(AuthError::Revoked.code(), ErrorCode::Unauthorized);
    }

    fn cfg() -> AuthConfig {
        AuthConfig::new(Some(b"secret".to_vec()), None, None, None, 0).unwrap()
    }

    fn claims(sub: &str, exp: u64) -> Claims {
        Claims {
            iat: None,
            sub: sub.into(),
            exp,
            nbf: None,
            aud: None,
            iss: None,
            chats: None,
            chat: None,
        }
    }

    #[test]
    fn accepts_a_good_token() {
        let t = cfg().mint_hs256(&claims("alice", now() + 60)).unwrap();
        let id = cfg().verify(&t).unwrap();
        assert_eq!(id.user.as_str(), "alice");
    }

    #[test]
    fn refuses_bad_tokens_with_typed_errors() {
        let c = cfg();
        assert_eq!(c.verify("").unwrap_err(), AuthError::Missing);
        let expired = c.mint_hs256(&claims("a", now() - 120)).unwrap();
        assert_eq!(c.verify(&expired).unwrap_err(), AuthError::Expired);
        let other = AuthConfig::new(Some(b"other".to_vec()), None, None, None, 0).unwrap();
        let wrong_key = other.mint_hs256(&claims("a", now() + 60)).unwrap();
        assert_eq!(c.verify(&wrong_key).unwrap_err(), AuthError::Signature);
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(format!(r#"{{"sub":"a","exp":{}}}"#, now() + 60))
        );
        assert_eq!(c.verify(&none).unwrap_err(), AuthError::Algorithm);
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims("a", now() + 60),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert_eq!(c.verify(&hs512).unwrap_err(), AuthError::Algorithm);
        assert!(matches!(
            c.verify("not-a-jwt").unwrap_err(),
            AuthError::Malformed(_)
        ));
        let bad_sub = c.mint_hs256(&claims("a.b", now() + 60)).unwrap();
        assert!(matches!(
            c.verify(&bad_sub).unwrap_err(),
            AuthError::Subject(_)
        ));
        let mut future = claims("a", now() + 600);
        future.nbf = Some(now() + 300);
        assert_eq!(
            c.verify(&c.mint_hs256(&future).unwrap()).unwrap_err(),
            AuthError::NotYetValid
        );
    }

    #[test]
    fn checks_audience_and_issuer() {
        let c = AuthConfig::new(
            Some(b"s".to_vec()),
            None,
            Some("sb".into()),
            Some("auth".into()),
            0,
        )
        .unwrap();
        let mut cl = claims("a", now() + 60);
        // No aud at all while one is required: refused.
        assert_eq!(
            c.verify(&c.mint_hs256(&cl).unwrap()).unwrap_err(),
            AuthError::WrongAudienceOrIssuer
        );
        cl.aud = Some("sb".into());
        cl.iss = Some("evil".into());
        assert_eq!(
            c.verify(&c.mint_hs256(&cl).unwrap()).unwrap_err(),
            AuthError::WrongAudienceOrIssuer
        );
        cl.iss = Some("auth".into());
        assert!(c.verify(&c.mint_hs256(&cl).unwrap()).is_ok());
    }

    #[test]
    fn chat_allowlist() {
        let c = cfg();
        let mut cl = claims("a", now() + 60);
        cl.chats = Some(vec!["room1".into()]);
        let id = c.verify(&c.mint_hs256(&cl).unwrap()).unwrap();
        assert!(id.grants(&ChatId::parse("room1").unwrap()));
        assert!(!id.grants(&ChatId::parse("room2").unwrap()));
        // No claim grants nothing: the mode decides (ADR 0031).
        let id = c
            .verify(&c.mint_hs256(&claims("a", now() + 60)).unwrap())
            .unwrap();
        assert!(!id.grants(&ChatId::parse("room1").unwrap()));
    }

    fn sub_claims(sub: &str, chat: &str, exp: u64) -> SubscriptionClaims {
        SubscriptionClaims {
            sub: sub.into(),
            chat: chat.into(),
            exp,
            nbf: None,
            aud: None,
            iss: None,
            publish: false,
        }
    }

    #[test]
    fn subscription_tokens_name_a_user_and_a_chat_and_stay_apart_from_connection_tokens() {
        let c = cfg();
        let sub = c.mint_hs256(&sub_claims("a", "room1", now() + 60)).unwrap();
        let grant = c.verify_subscription(&sub).unwrap();
        assert_eq!(grant.user.as_str(), "a");
        assert_eq!(grant.chat.as_str(), "room1");
        assert!(!grant.publish);
        // One kind does not stand in for the other.
        assert!(matches!(c.verify(&sub), Err(AuthError::Malformed(_))));
        let conn = c.mint_hs256(&claims("a", now() + 60)).unwrap();
        assert!(matches!(
            c.verify_subscription(&conn),
            Err(AuthError::Malformed(_))
        ));
        let old = c.mint_hs256(&sub_claims("a", "room1", now() - 60)).unwrap();
        assert_eq!(c.verify_subscription(&old).unwrap_err(), AuthError::Expired);
        let bad = c
            .mint_hs256(&sub_claims("a", "bad.chat", now() + 60))
            .unwrap();
        assert!(matches!(
            c.verify_subscription(&bad),
            Err(AuthError::Malformed(_))
        ));
    }
}
