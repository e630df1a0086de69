//! Backend URLs as they may appear in logs and errors: the chart passes a
//! Redis password inside the URL, so credentials are masked first.

/// Masks the user-info (`user:password@`) of each comma-separated URL.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let Some((scheme, rest)) = url.split_once("://") else {
                return url.to_owned();
            };
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
                None => url.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn credentials_are_masked_and_the_rest_kept() {
        assert_eq!(
            redact_url("redis://:S3cret@redis-master:6379/0"),
            "redis://***@redis-master:6379/0"
        );
        assert_eq!(
            redact_url("nats://u:p@a:4222, nats://b:4222,nats://tok@c:4222"),
            "nats://***@a:4222,nats://b:4222,nats://***@c:4222"
        );
        assert_eq!(redact_url("redis://h:6379/x@y"), "redis://h:6379/x@y");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            redact_url("redis+cluster://:pw@h1:7000,h2:7001"),
            "redis+cluster://***@h1:7000,h2:7001"
        );
        assert_eq!(
            redact_url("redis+sentinel://u:pw@s1:26379,s2/sbmaster"),
            "redis+sentinel://***@s1:26379,s2/sbmaster"
        );
        // A password may itself hold '@' (URL-unsafe, but still masked).
        assert_eq!(redact_url("redis://:a@b@h:1"), "redis://***@h:1");
    }
}
