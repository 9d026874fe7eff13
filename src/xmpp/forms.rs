//! XEP-0004 data forms, as far as Reach needs them: build a form to show, read a submitted one.
//!
//! Forms ride inside other payloads (ad-hoc commands, registration), so they are plain
//! `jabber:x:data` elements; this module only builds and reads them. It knows nothing of what a
//! field means: the command or registration handler decides that.

use std::collections::BTreeMap;

use minidom::Element;

use crate::xmpp::stanza::{an, NONE};

/// XEP-0004 data forms (`jabber:x:data`).
pub use xmpp_parsers::ns::DATA_FORMS;

/// The `type` of a form (XEP-0004 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormType {
    /// A form to fill in.
    Form,
    /// A filled-in form.
    Submit,
    /// The requester gave up.
    Cancel,
    /// Data to show.
    Result,
}

impl FormType {
    pub fn as_str(self) -> &'static str {
        match self {
            FormType::Form => "form",
            FormType::Submit => "submit",
            FormType::Cancel => "cancel",
            FormType::Result => "result",
        }
    }

    pub fn parse(s: &str) -> Option<FormType> {
        Some(match s {
            "form" => FormType::Form,
            "submit" => FormType::Submit,
            "cancel" => FormType::Cancel,
            "result" => FormType::Result,
            _ => return None,
        })
    }
}

/// The `type` of a field (XEP-0004 §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Boolean,
    Fixed,
    Hidden,
    JidMulti,
    JidSingle,
    ListMulti,
    ListSingle,
    TextMulti,
    TextPrivate,
    TextSingle,
}

impl FieldType {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::Boolean => "boolean",
            FieldType::Fixed => "fixed",
            FieldType::Hidden => "hidden",
            FieldType::JidMulti => "jid-multi",
            FieldType::JidSingle => "jid-single",
            FieldType::ListMulti => "list-multi",
            FieldType::ListSingle => "list-single",
            FieldType::TextMulti => "text-multi",
            FieldType::TextPrivate => "text-private",
            FieldType::TextSingle => "text-single",
        }
    }
}

/// One field of a form to build. Built with [`FieldSpec::new`] and the chained setters:
/// `FieldSpec::new("code", FieldType::TextSingle).label("Code").required()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldSpec {
    pub var: String,
    pub type_: FieldType,
    pub label: Option<String>,
    pub desc: Option<String>,
    pub required: bool,
    /// Current or default values, in order.
    pub values: Vec<String>,
    /// The choices of a list field: (label, value).
    pub options: Vec<(String, String)>,
}

impl FieldSpec {
    pub fn new(var: impl Into<String>, type_: FieldType) -> FieldSpec {
        FieldSpec {
            var: var.into(),
            type_,
            label: None,
            desc: None,
            required: false,
            values: Vec::new(),
            options: Vec::new(),
        }
    }

    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    pub fn desc(mut self, desc: impl Into<String>) -> Self {
        self.desc = Some(desc.into());
        self
    }

    pub fn required(mut self) -> Self {
        self.required = true;
        self
    }

    pub fn value(mut self, value: impl Into<String>) -> Self {
        self.values.push(value.into());
        self
    }

    /// Several current values at once (a `*-multi` field).
    pub fn values<S: Into<String>>(mut self, values: impl IntoIterator<Item = S>) -> Self {
        self.values.extend(values.into_iter().map(Into::into));
        self
    }

    /// A hidden field carrying `value` back with the submission (XEP-0004 §3.3).
    pub fn hidden(var: impl Into<String>, value: impl Into<String>) -> FieldSpec {
        FieldSpec::new(var, FieldType::Hidden).value(value)
    }

    pub fn option(mut self, label: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.push((label.into(), value.into()));
        self
    }

    /// The `<field/>` element.
    pub fn to_element(&self) -> Element {
        let mut field = Element::builder("field", DATA_FORMS)
            .attr(an("type"), self.type_.as_str())
            .build();
        // A fixed field may go without a var (XEP-0004 §3.2).
        if !self.var.is_empty() {
            field.set_attr(NONE, an("var"), self.var.as_str());
        }
        if let Some(label) = &self.label {
            field.set_attr(NONE, an("label"), label.as_str());
        }
        if let Some(desc) = &self.desc {
            field.append_child(text_child("desc", desc));
        }
        if self.required {
            field.append_child(Element::builder("required", DATA_FORMS).build());
        }
        for value in &self.values {
            field.append_child(text_child("value", value));
        }
        for (label, value) in &self.options {
            let mut option = Element::builder("option", DATA_FORMS).build();
            option.set_attr(NONE, an("label"), label.as_str());
            option.append_child(text_child("value", value));
            field.append_child(option);
        }
        field
    }
}

fn text_child(name: &str, text: &str) -> Element {
    Element::builder(name, DATA_FORMS).append(text).build()
}

/// A form: `<x xmlns='jabber:x:data' type='…'>` with an optional title and instructions (one
/// `<instructions/>` per line, as XEP-0004 asks) and the fields in order.
pub fn form(
    type_: FormType,
    title: Option<&str>,
    instructions: Option<&str>,
    fields: &[FieldSpec],
) -> Element {
    let mut x = Element::builder("x", DATA_FORMS)
        .attr(an("type"), type_.as_str())
        .build();
    if let Some(title) = title {
        x.append_child(text_child("title", title));
    }
    for line in instructions.into_iter().flat_map(str::lines) {
        x.append_child(text_child("instructions", line));
    }
    for field in fields {
        x.append_child(field.to_element());
    }
    x
}

/// The first data form among `parent`'s children.
pub fn find_form(parent: &Element) -> Option<&Element> {
    parent.get_child("x", DATA_FORMS)
}

/// The type of a form element, if it is one of XEP-0004's.
pub fn form_type(x: &Element) -> Option<FormType> {
    x.attr("type").and_then(FormType::parse)
}

/// The values of a (submitted) form, by field var. A field sent without `<value/>` maps to an
/// empty list; fields without a var are left out; a var sent twice keeps the values of both.
pub fn form_values(x: &Element) -> BTreeMap<String, Vec<String>> {
    let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for field in x.children().filter(|c| c.is("field", DATA_FORMS)) {
        let Some(var) = field.attr("var") else {
            continue;
        };
        values.entry(var.to_owned()).or_default().extend(
            field
                .children()
                .filter(|c| c.is("value", DATA_FORMS))
                .map(|v| v.text()),
        );
    }
    values
}

/// The first value of a field, or `""` when the field or its value is missing: what a
/// single-valued field says.
pub fn first_value<'a>(values: &'a BTreeMap<String, Vec<String>>, var: &str) -> &'a str {
    values
        .get(var)
        .and_then(|v| v.first())
        .map(String::as_str)
        .unwrap_or("")
}

/// Every value of a field, or none when the field is missing: what a `*-multi` field says.
pub fn all_values<'a>(values: &'a BTreeMap<String, Vec<String>>, var: &str) -> &'a [String] {
    values.get(var).map(Vec::as_slice).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_form_with_title_instructions_and_fields() {
        let x = form(
            FormType::Form,
            Some("Verify"),
            Some("Enter the code.\nIt is valid 10 minutes."),
            &[
                FieldSpec::new("code", FieldType::TextSingle)
                    .label("Code")
                    .required(),
                FieldSpec::new("when", FieldType::ListSingle)
                    .value("away")
                    .option("When away", "away")
                    .option("Always", "always"),
            ],
        );
        let expected: Element = "<x xmlns='jabber:x:data' type='form'>\
             <title>Verify</title>\
             <instructions>Enter the code.</instructions>\
             <instructions>It is valid 10 minutes.</instructions>\
             <field type='text-single' var='code' label='Code'><required/></field>\
             <field type='list-single' var='when'><value>away</value>\
             <option label='When away'><value>away</value></option>\
             <option label='Always'><value>always</value></option></field></x>"
            .parse()
            .unwrap();
        assert_eq!(x, expected);
    }

    #[test]
    fn reads_the_values_of_a_submitted_form() {
        let x: Element = "<x xmlns='jabber:x:data' type='submit'>\
             <field var='code'><value>123456</value></field>\
             <field var='empty'/>\
             <field var='many'><value>a</value><value>b</value></field>\
             <field><value>no var</value></field></x>"
            .parse()
            .unwrap();
        assert_eq!(form_type(&x), Some(FormType::Submit));
        let values = form_values(&x);
        assert_eq!(values.len(), 3);
        assert_eq!(first_value(&values, "code"), "123456");
        assert_eq!(values["empty"], Vec::<String>::new());
        assert_eq!(first_value(&values, "empty"), "");
        assert_eq!(values["many"], vec!["a", "b"]);
        assert_eq!(first_value(&values, "missing"), "");
    }

    #[test]
    fn multi_and_hidden_fields() {
        let x = form(
            FormType::Form,
            None,
            None,
            &[
                FieldSpec::hidden("page", "preferences"),
                FieldSpec::new("alerts", FieldType::JidMulti)
                    .values(["bob@example.net", "carol@example.org"]),
            ],
        );
        let expected: Element = "<x xmlns='jabber:x:data' type='form'>\
             <field type='hidden' var='page'><value>preferences</value></field>\
             <field type='jid-multi' var='alerts'><value>bob@example.net</value>\
             <value>carol@example.org</value></field></x>"
            .parse()
            .unwrap();
        assert_eq!(x, expected);
        let values = form_values(&x);
        assert_eq!(
            all_values(&values, "alerts"),
            ["bob@example.net", "carol@example.org"]
        );
        assert!(all_values(&values, "missing").is_empty());
        assert_eq!(first_value(&values, "page"), "preferences");
    }

    #[test]
    fn a_built_form_reads_back_its_values() {
        let x = form(
            FormType::Submit,
            None,
            None,
            &[FieldSpec::new("code", FieldType::TextSingle).value("000111")],
        );
        assert_eq!(form_type(&x), Some(FormType::Submit));
        assert_eq!(first_value(&form_values(&x), "code"), "000111");
        let wrapper = Element::builder("command", "urn:example").append(x).build();
        assert!(find_form(&wrapper).is_some());
    }
}
