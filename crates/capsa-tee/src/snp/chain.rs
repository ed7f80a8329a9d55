//! Chains of trust: ARK → ASK → VCEK and ARK → ASVK → VLEK, anchored in
//! AMD's pinned roots or, only when the caller says so, in a sim root.

use aws_lc_rs::signature::ParsedPublicKey;
use time::OffsetDateTime;

use super::Product;
use super::certs::{AmdCert, CertError, KeyExtensions, parse_pem_certs};
use crate::claims::AttestationType;

/// The Organization of every certificate the sim platform issues. A root
/// with it is never AMD's, and is trusted only under [`SimTrust`].
pub use crate::sim::SIM_ORGANIZATION;

const PINNED: [(Product, &[u8]); 3] = [
    (Product::Milan, include_bytes!("../../roots/milan_ask_ark_asvk.pem")),
    (Product::Genoa, include_bytes!("../../roots/genoa_ask_ark_asvk.pem")),
    (Product::Turin, include_bytes!("../../roots/turin_ask_ark_asvk.pem")),
];

/// Why a certificate chain is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// One certificate failed a check.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The endorsement certificate is neither a VCEK nor a VLEK.
    #[error("the endorsement certificate's common name is \"{found}\", expected SEV-VCEK or SEV-VLEK")]
    NotEndorsementKey {
        /// The name found.
        found: String,
    },
    /// The issuer of the endorsement key names no known product.
    #[error("the {kind} was issued by \"{issuer}\", which names no SEV-SNP product capsa knows (Milan, Genoa, Turin)")]
    UnknownProduct {
        /// VCEK or VLEK.
        kind: EndorsementKind,
        /// The issuer's common name.
        issuer: String,
    },
    /// The supplied chain lacks a certificate.
    #[error("the certificate chain has no {role} (CN={expected_cn}): pass AMD's cert_chain for {product}")]
    MissingCert {
        /// Which certificate.
        role: &'static str,
        /// The common name looked for.
        expected_cn: String,
        /// The product.
        product: Product,
    },
    /// The ARK of the supplied chain is not a trusted root.
    #[error("the chain's ARK \"{subject}\" is not AMD's pinned ARK-{product}: refusing an unknown root")]
    UntrustedRoot {
        /// The product.
        product: Product,
        /// The ARK's subject.
        subject: String,
    },
    /// The ARK is the sim platform's, and sim evidence was not allowed.
    #[error(
        "the chain's root is a capsa sim platform root, not AMD hardware: sim evidence gives no confidentiality and is refused unless explicitly allowed (--allow-sim)"
    )]
    SimNotAllowed,
    /// The ARK is a sim root, but not the one pinned.
    #[error("the chain's root is a capsa sim root other than the pinned one")]
    SimRootNotPinned,
    /// The productName extension disagrees with the issuing chain.
    #[error("the {kind}'s productName \"{found}\" does not belong to the {product} chain that issued it")]
    ProductName {
        /// VCEK or VLEK.
        kind: EndorsementKind,
        /// The chain's product.
        product: Product,
        /// The productName found.
        found: String,
    },
}

impl ChainError {
    /// Whether the input could not be read at all, as opposed to read and
    /// found untrustworthy.
    pub fn is_malformed(&self) -> bool {
        matches!(self, Self::Cert(CertError::Malformed { .. }))
    }
}

/// Which endorsement key a chain ends in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndorsementKind {
    /// Versioned chip endorsement key, unique to a chip and TCB.
    Vcek,
    /// Versioned loaded endorsement key, issued to a cloud provider.
    Vlek,
}

impl EndorsementKind {
    fn intermediate_cn(self, product: Product) -> String {
        match self {
            Self::Vcek => format!("SEV-{product}"),
            Self::Vlek => format!("SEV-VLEK-{product}"),
        }
    }
    fn intermediate_role(self) -> &'static str {
        match self {
            Self::Vcek => "ASK",
            Self::Vlek => "ASVK",
        }
    }
}

impl std::fmt::Display for EndorsementKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Vcek => "VCEK",
            Self::Vlek => "VLEK",
        })
    }
}

/// Whether roots of capsa's sim platform are trusted.
#[derive(Debug, Clone, Default)]
pub enum SimTrust {
    /// Sim roots are refused (the default).
    #[default]
    Refuse,
    /// Only these sim ARKs are trusted (a trust service pins its own).
    Pinned(Vec<AmdCert>),
    /// Any self-signed root marked as sim is trusted. Sim evidence proves
    /// nothing about confidentiality, so this only decides whether sim is
    /// acceptable at all: for development and CI.
    DangerAnySimRoot,
}

/// One product's ARK and intermediates.
#[derive(Debug, Clone)]
struct ProductRoots {
    product: Product,
    ark: AmdCert,
    ask: AmdCert,
    asvk: AmdCert,
}

/// The roots a [`Verifier`] trusts.
#[derive(Debug, Clone)]
pub struct RootStore {
    amd: Vec<ProductRoots>,
    sim: SimTrust,
}

impl RootStore {
    /// AMD's pinned roots for Milan, Genoa and Turin; no sim roots.
    pub fn amd() -> Self {
        let amd = PINNED
            .iter()
            .filter_map(|(product, pem)| {
                let ders = parse_pem_certs(pem).ok()?;
                let [ask, ark, asvk] = <[Vec<u8>; 3]>::try_from(ders).ok()?;
                Some(ProductRoots {
                    product: *product,
                    ask: AmdCert::from_der("ASK", &ask).ok()?,
                    ark: AmdCert::from_der("ARK", &ark).ok()?,
                    asvk: AmdCert::from_der("ASVK", &asvk).ok()?,
                })
            })
            .collect();
        Self { amd, sim: SimTrust::Refuse }
    }

    /// Sets whether sim roots are trusted.
    pub fn with_sim(mut self, sim: SimTrust) -> Self {
        self.sim = sim;
        self
    }

    fn pinned(&self, product: Product) -> Option<&ProductRoots> {
        self.amd.iter().find(|r| r.product == product)
    }
}

/// Verifies endorsement chains against a [`RootStore`].
#[derive(Debug, Clone)]
pub struct Verifier {
    roots: RootStore,
}

/// A VCEK or VLEK whose chain to a trusted root has been verified; it
/// verifies reports.
pub struct VerifiedChain {
    pub(crate) product: Product,
    pub(crate) kind: EndorsementKind,
    pub(crate) extensions: KeyExtensions,
    pub(crate) key: ParsedPublicKey,
    pub(crate) attestation_type: AttestationType,
}

impl std::fmt::Debug for VerifiedChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedChain")
            .field("product", &self.product)
            .field("kind", &self.kind)
            .field("extensions", &self.extensions)
            .field("attestation_type", &self.attestation_type)
            .finish_non_exhaustive()
    }
}

impl VerifiedChain {
    /// The processor line of the chain.
    pub fn product(&self) -> Product {
        self.product
    }
    /// VCEK or VLEK.
    pub fn kind(&self) -> EndorsementKind {
        self.kind
    }
    /// What the endorsement certificate certifies.
    pub fn extensions(&self) -> &KeyExtensions {
        &self.extensions
    }
    /// `SevSnpVm` for AMD roots, `Sim` for a sim root.
    pub fn attestation_type(&self) -> AttestationType {
        self.attestation_type
    }
}

impl Verifier {
    /// A verifier trusting `roots`.
    pub fn new(roots: RootStore) -> Self {
        Self { roots }
    }

    /// Verifies an endorsement certificate (DER or PEM) and the chain to a
    /// trusted root, at instant `at`. `chain_pem` holds the intermediate and
    /// ARK (AMD's `cert_chain` format); without it the pinned AMD chain for
    /// the certificate's product is used.
    pub fn verify_chain(
        &self,
        endorsement: &[u8],
        chain_pem: Option<&[u8]>,
        at: OffsetDateTime,
    ) -> Result<VerifiedChain, ChainError> {
        let leaf = parse_any("endorsement key", endorsement)?;
        let kind = match leaf.common_name().as_deref() {
            Some("SEV-VCEK") => EndorsementKind::Vcek,
            Some("SEV-VLEK") => EndorsementKind::Vlek,
            other => return Err(ChainError::NotEndorsementKey { found: other.unwrap_or_default().to_owned() }),
        };
        let leaf = AmdCert::from_der(if kind == EndorsementKind::Vcek { "VCEK" } else { "VLEK" }, leaf.der())?;
        let product = self.product_of_issuer(&leaf, kind)?;

        let (intermediate, ark, attestation_type) = match chain_pem {
            None => {
                let pinned = self.roots.pinned(product).ok_or(ChainError::MissingCert {
                    role: "ARK",
                    expected_cn: format!("ARK-{product}"),
                    product,
                })?;
                let intermediate = match kind {
                    EndorsementKind::Vcek => pinned.ask.clone(),
                    EndorsementKind::Vlek => pinned.asvk.clone(),
                };
                (intermediate, pinned.ark.clone(), AttestationType::SevSnpVm)
            }
            Some(pem) => {
                let certs = parse_pem_certs(pem).map_err(|reason| CertError::Malformed { role: "chain", reason })?;
                let mut intermediate = None;
                let mut ark = None;
                let wanted_intermediate = kind.intermediate_cn(product);
                for der in certs {
                    let cert = AmdCert::from_der("chain", &der)?;
                    match cert.common_name() {
                        Some(cn) if cn == wanted_intermediate => {
                            intermediate = Some(AmdCert::from_der(kind.intermediate_role(), &der)?)
                        }
                        Some(cn) if cn == format!("ARK-{product}") => ark = Some(AmdCert::from_der("ARK", &der)?),
                        _ => {}
                    }
                }
                let intermediate = intermediate.ok_or(ChainError::MissingCert {
                    role: kind.intermediate_role(),
                    expected_cn: wanted_intermediate,
                    product,
                })?;
                let ark =
                    ark.ok_or(ChainError::MissingCert { role: "ARK", expected_cn: format!("ARK-{product}"), product })?;
                let attestation_type = self.trust_of(&ark, product)?;
                (intermediate, ark, attestation_type)
            }
        };

        ark.verify_issued_by(&ark)?;
        intermediate.verify_issued_by(&ark)?;
        leaf.verify_issued_by(&intermediate)?;
        for cert in [&ark, &intermediate, &leaf] {
            cert.check_validity(at)?;
        }
        let extensions = leaf.endorsement_extensions(product)?;
        // VCEK product names carry a stepping ("Milan-B0"), VLEK ones do not.
        let named = extensions.product_name.split('-').next().unwrap_or_default();
        if named != product.name() {
            return Err(ChainError::ProductName { kind, product, found: extensions.product_name });
        }
        let key = leaf.p384_public_key()?;
        Ok(VerifiedChain { product, kind, extensions, key, attestation_type })
    }

    fn product_of_issuer(&self, leaf: &AmdCert, kind: EndorsementKind) -> Result<Product, ChainError> {
        let issuer = leaf.issuer_common_name().unwrap_or_default();
        let name = match kind {
            EndorsementKind::Vcek => issuer.strip_prefix("SEV-"),
            EndorsementKind::Vlek => issuer.strip_prefix("SEV-VLEK-"),
        };
        name.and_then(Product::from_name).ok_or(ChainError::UnknownProduct { kind, issuer })
    }

    /// Decides whether a supplied ARK is trusted, and as what.
    fn trust_of(&self, ark: &AmdCert, product: Product) -> Result<AttestationType, ChainError> {
        if self.roots.pinned(product).is_some_and(|p| p.ark.same_key_and_name(ark)) {
            return Ok(AttestationType::SevSnpVm);
        }
        if ark.organization().as_deref() != Some(SIM_ORGANIZATION) {
            return Err(ChainError::UntrustedRoot { product, subject: ark.subject_string() });
        }
        match &self.roots.sim {
            SimTrust::Refuse => Err(ChainError::SimNotAllowed),
            SimTrust::DangerAnySimRoot => Ok(AttestationType::Sim),
            SimTrust::Pinned(roots) if roots.iter().any(|r| r.same_key_and_name(ark)) => Ok(AttestationType::Sim),
            SimTrust::Pinned(_) => Err(ChainError::SimRootNotPinned),
        }
    }
}

/// Parses a certificate given as DER or PEM.
fn parse_any(role: &'static str, bytes: &[u8]) -> Result<AmdCert, CertError> {
    // DER starts with a SEQUENCE tag (0x30), never with text.
    if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        AmdCert::from_pem(role, bytes)
    } else {
        AmdCert::from_der(role, bytes)
    }
}
