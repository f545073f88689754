// Command render_template renders an Ollama TEMPLATE the way Ollama fills it, so kiln's
// tests can check a Modelfile's Go template against the HF Jinja template without an
// Ollama server (none can be installed here).
//
// stdin:  {"template": "...", "messages": [{"role": "...", "content": "...", "thinking": "..."}, ...], "think": true}
// ("think" is optional: the request's think setting, true or false; absent = not set)
// stdout: the rendered prompt, byte for byte.
//
// Semantics mirrored from ollama/ollama template/template.go (written independently):
//   - parse with missingkey=zero and the extra func "json" (Go's builtins give eq, len,
//     slice, index, not, and, or, printf, ...);
//   - consecutive messages of the same role (except "tool") are merged with "\n\n";
//     .System is all system contents joined with "\n\n";
//   - a template that mentions .Messages (or .Document) runs once with
//     {System, Messages, Tools, Response: "", Think, IsThinkSet, ...}; .Prompt is not set;
//     Think is the request's think value and IsThinkSet whether the request gave one;
//   - any other template runs once per user turn with {System, Prompt, Response}, and the
//     last run is cut right after {{ .Response }} (a template naming neither .Messages nor
//     .Response gets {{ .Response }} appended at parse time).
//
// Standard library only.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type ToolFunction struct {
	Name      string         `json:"name"`
	Arguments map[string]any `json:"arguments"`
}

type ToolCall struct {
	Function ToolFunction `json:"function"`
}

type Message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	Thinking  string     `json:"thinking,omitempty"`
	ToolCalls []ToolCall `json:"tool_calls,omitempty"`
	ToolName  string     `json:"tool_name,omitempty"`
}

type request struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
	Think    *bool     `json:"think"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

// identifiers lists field and variable names used by a node, like Ollama's Vars():
// only list, action, template, branch (if/range/with) and pipe nodes are walked.
func identifiers(n parse.Node) []string {
	var out []string
	switch n := n.(type) {
	case *parse.ListNode:
		if n == nil {
			return nil
		}
		for _, c := range n.Nodes {
			out = append(out, identifiers(c)...)
		}
	case *parse.ActionNode:
		out = identifiers(n.Pipe)
	case *parse.TemplateNode:
		if n.Pipe != nil {
			out = identifiers(n.Pipe)
		}
	case *parse.IfNode:
		out = branchIdentifiers(&n.BranchNode)
	case *parse.RangeNode:
		out = branchIdentifiers(&n.BranchNode)
	case *parse.WithNode:
		out = branchIdentifiers(&n.BranchNode)
	case *parse.PipeNode:
		if n == nil {
			return nil
		}
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				out = append(out, identifiers(a)...)
			}
		}
	case *parse.FieldNode:
		out = n.Ident
	case *parse.VariableNode:
		out = n.Ident
	}
	return out
}

func branchIdentifiers(b *parse.BranchNode) []string {
	out := identifiers(b.Pipe)
	out = append(out, identifiers(b.List)...)
	if b.ElseList != nil {
		out = append(out, identifiers(b.ElseList)...)
	}
	return out
}

func vars(t *template.Template) map[string]bool {
	set := map[string]bool{}
	for _, tt := range t.Templates() {
		if tt.Tree == nil {
			continue
		}
		for _, n := range tt.Root.Nodes {
			for _, id := range identifiers(n) {
				set[strings.ToLower(id)] = true
			}
		}
	}
	return set
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role && m.Role != "tool" {
			out[len(out)-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, &m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

// cutAfterResponse keeps nodes up to and including the first {{ .Response }} field and
// drops everything after it (Ollama does this for the last turn of a legacy template).
func cutAfterResponse(root *parse.ListNode) *parse.ListNode {
	cut := false
	var prune func(n parse.Node) parse.Node
	pruneList := func(l *parse.ListNode) *parse.ListNode {
		var keep []parse.Node
		for _, c := range l.Nodes {
			if k := prune(c); k != nil {
				keep = append(keep, k)
			}
		}
		l.Nodes = keep
		return l
	}
	pruneBranch := func(b *parse.BranchNode) { // like Ollama: conditions are not visited
		b.List = pruneList(b.List)
		if b.ElseList != nil {
			b.ElseList = pruneList(b.ElseList)
		}
	}
	prune = func(n parse.Node) parse.Node {
		if f, ok := n.(*parse.FieldNode); ok {
			for _, id := range f.Ident {
				if id == "Response" {
					cut = true
					return n
				}
			}
		}
		if cut {
			return nil
		}
		switch t := n.(type) {
		case *parse.ListNode:
			return pruneList(t)
		case *parse.IfNode:
			pruneBranch(&t.BranchNode)
		case *parse.RangeNode:
			pruneBranch(&t.BranchNode)
		case *parse.WithNode:
			pruneBranch(&t.BranchNode)
		case *parse.ActionNode:
			p := prune(t.Pipe)
			if p == nil {
				return nil
			}
			t.Pipe = p.(*parse.PipeNode)
		case *parse.PipeNode:
			var cmds []*parse.CommandNode
			for _, c := range t.Cmds {
				var args []parse.Node
				for _, a := range c.Args {
					if k := prune(a); k != nil {
						args = append(args, k)
					}
				}
				if len(args) == 0 {
					return nil
				}
				c.Args = args
				cmds = append(cmds, c)
			}
			if len(cmds) == 0 {
				return nil
			}
			t.Cmds = cmds
		}
		return n
	}
	return prune(root.CopyList()).(*parse.ListNode)
}

func render(w io.Writer, src string, msgs []Message, think *bool) error {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(src)
	if err != nil {
		return err
	}
	v := vars(tmpl)
	if !v["messages"] && !v["response"] {
		tmpl.Tree.Root.Nodes = append(tmpl.Tree.Root.Nodes, &parse.ActionNode{
			NodeType: parse.NodeAction,
			Pipe: &parse.PipeNode{NodeType: parse.NodePipe, Cmds: []*parse.CommandNode{{
				NodeType: parse.NodeCommand,
				Args:     []parse.Node{&parse.FieldNode{NodeType: parse.NodeField, Ident: []string{"Response"}}},
			}}},
		})
	}

	system, collated := collate(msgs)
	thinkOn, thinkSet := think != nil && *think, think != nil
	if v["messages"] || v["document"] {
		return tmpl.Execute(w, map[string]any{
			"System": system, "Messages": collated, "Tools": nil, "Response": "",
			"Think": thinkOn, "IsThinkSet": thinkSet, "Query": "", "Document": "", "Instruction": "",
		})
	}

	var b bytes.Buffer
	var sys, prompt, response string
	values := func() map[string]any {
		return map[string]any{"System": sys, "Prompt": prompt, "Response": response, "Think": thinkOn,
			"IsThinkSet": thinkSet}
	}
	flush := func() error {
		if err := tmpl.Execute(&b, values()); err != nil {
			return err
		}
		sys, prompt, response = "", "", ""
		return nil
	}
	for _, m := range collated {
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				if err := flush(); err != nil {
					return err
				}
			}
			sys = m.Content
		case "user":
			if response != "" {
				if err := flush(); err != nil {
					return err
				}
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}
	// Ollama builds this last-turn template without Option/Funcs; so do we.
	last, err := template.New("").AddParseTree("", &parse.Tree{Root: cutAfterResponse(tmpl.Tree.Root)})
	if err != nil {
		return err
	}
	if err := last.Execute(&b, values()); err != nil {
		return err
	}
	_, err = io.Copy(w, &b)
	return err
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "render_template: bad input JSON:", err)
		os.Exit(2)
	}
	if err := render(os.Stdout, req.Template, req.Messages, req.Think); err != nil {
		fmt.Fprintln(os.Stderr, "render_template:", err)
		os.Exit(1)
	}
}
